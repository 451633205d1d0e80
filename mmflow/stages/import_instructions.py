"""``import_instructions``: a LLaVA JSON/JSONL file and its image folder, checked, into shards and
an instruction table.

``file`` is LLaVA's format (``[{"id", "image", "conversations": [{"from", "value"}, ...]}]`` as a
``.json`` list or one object per ``.jsonl`` line), local or ``s3://``; each entry's ``image`` is
relative to ``image_folder``. The driver reads and checks the entries and plans the shards:
every distinct image (by normalised path) once, in order of first use, ``samples_per_shard`` to
a shard. One Ray task per shard then reads and decodes its images through ``Storage`` and
writes an img2dataset shard (output ``shards``) and the table file of the same name (output
``instructions``, see ``mmflow/data/instructions.py``) whose rows point at them by key and shard
URI. ``kind``: ``caption`` (LLaVA-Pretrain: every entry one turn, a stage-1 row), ``conversation``
(instruct files) or ``auto`` (one-turn entries are captions, longer ones conversations).

Nothing in the file fails the stage. A rejected entry is counted by kind (metrics
``rejected_<kind>``, ``rejected_total``; ``imported`` counts rows) and listed in
``_rejected.jsonl`` (index, id, kind, detail) in the table folder; the ``_`` keeps it out of
``pyarrow.parquet.read_table(folder)``, which would fail on a non-Parquet file. Kinds:
``bad_encoding`` and ``bad_json`` (a line or entry that does not read), the ``check_entry``
problems (``malformed``, ``no_image``, ``wrong_turn_order``, ``no_image_token``,
``extra_image_token``, ``empty_answer``), ``unsafe_image_path`` (absolute or ``..``: it would
read outside the folder), ``multi_turn_caption`` (with ``kind: caption``), ``missing_image`` and
``unreadable_image`` (PIL cannot decode it whole; every entry using the image is rejected).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from mmflow.data.ingest_images import ImageError, ImageOptions, StoredImage, process_image
from mmflow.data.instructions import (
    ENTRY_PROBLEMS,
    READ_PROBLEMS,
    TABLE_FORMAT,
    check_entry,
    image_first,
    instruction_row,
    read_llava_file,
    safe_image_path,
    write_instruction_table,
)
from mmflow.data.preview import log_preview
from mmflow.data.shards import ShardWriter, map_shards, sample_key, shard_name, stats_uri
from mmflow.params import required_field, required_text
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.storage import Storage, join, normalize

IMAGE_PROBLEMS = ("missing_image", "unreadable_image")
PLAN_PROBLEMS = ("unsafe_image_path", "multi_turn_caption")
REJECTED_KINDS = (*READ_PROBLEMS, *ENTRY_PROBLEMS, *PLAN_PROBLEMS, *IMAGE_PROBLEMS)
DETAILS = {
    "bad_encoding": "not valid UTF-8",
    "bad_json": "does not parse as JSON",
    "malformed": "not an object with a list of {from, value} string turns",
    "no_image": "no image field (a text-only entry)",
    "no_image_token": "the first human turn has no <image>",
    "wrong_turn_order": "turns must alternate human, gpt, ... and end with gpt",
    "extra_image_token": "more than one <image> in the conversation",
    "empty_answer": "a gpt turn is empty",
    "unsafe_image_path": "the image path leaves image_folder",
    "multi_turn_caption": "more than one turn in a caption file (kind: caption)",
}
REJECTED_FILE = "_rejected.jsonl"  # "_": Parquet readers of the folder skip it


class ImportInstructionsParams(Params):
    file: str | None = required_field("a LLaVA .json or .jsonl file (or s3://)")
    image_folder: str | None = required_field("the folder the entries' image paths start from")
    samples_per_shard: int = Field(1000, ge=1, le=100_000, description="images per tar shard")
    image_size: int | None = Field(
        None, ge=8, le=8192, description="shrink the longer side to this; None keeps the bytes"
    )
    kind: Literal["auto", "caption", "conversation"] = "auto"
    preview: int = Field(16, ge=0, le=256, description="images in the MLflow grid")

    @field_validator("file", "image_folder")
    @classmethod
    def _required(cls, v: str | None, info) -> str:
        return required_text(v, f"no {info.field_name}: set {info.field_name} (local or s3://)")


@dataclass
class Plan:
    shards: list[list[dict[str, Any]]] = field(default_factory=list)  # [{image, entries}]
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {index, id, kind, detail}
    entries: int = 0


def plan_import(data: bytes, name: str, p: ImportInstructionsParams) -> Plan:
    """Read and check every entry, give each a unique id and each distinct image a shard slot."""
    plan, images, ids = Plan(), {}, set()
    for index, entry, reason in read_llava_file(data, name=name):
        plan.entries += 1
        source_id = entry.get("id") if isinstance(entry, dict) else None
        reason = reason or check_entry(entry)
        path = safe_image_path(entry["image"]) if reason is None else None
        if reason is None and path is None:
            reason = "unsafe_image_path"
        pairs = len(entry["conversations"]) // 2 if reason is None else 0
        if reason is None and p.kind == "caption" and pairs > 1:
            reason = "multi_turn_caption"
        if reason is not None:
            detail = DETAILS[reason]
            if reason == "wrong_turn_order":
                detail = f"{detail}; got {[t['from'] for t in entry['conversations']][:8]}"
            plan.rejected.append(_rejected(index, source_id, reason, detail))
            continue
        rid = str(source_id) if source_id not in (None, "") else f"#{index}"
        while rid in ids:  # ids repeat in some LLaVA files; the table's must not
            rid = f"{rid}#{index}"
        ids.add(rid)
        kind = "conversation" if p.kind == "conversation" or pairs > 1 else "caption"
        turns = image_first(entry["conversations"])
        images.setdefault(path, []).append(dict(index=index, id=rid, kind=kind, turns=turns))
    slots = [{"image": path, "entries": uses} for path, uses in images.items()]
    n = p.samples_per_shard
    plan.shards = [slots[i : i + n] for i in range(0, len(slots), n)]
    return plan


def _rejected(index: int, source_id: Any, kind: str, detail: str) -> dict[str, Any]:
    shown = source_id if isinstance(source_id, str | int) else None
    return {"index": index, "id": shown, "kind": kind, "detail": detail[:300]}


@dataclass(frozen=True)
class ImportJob:
    plans: str  # folder of the per-shard plans ({shard:05d}.json)
    image_folder: str
    shards: str  # output folder of the image shards
    table: str  # output folder of the table files
    image_size: int | None
    storage: Storage


def import_shard(shard: int, job: ImportJob) -> dict[str, Any]:
    """One planned shard: its images into a tar, its entries into a table file (a Ray task)."""
    storage = job.storage
    slots = storage.read_json(join(job.plans, f"{shard_name(shard)}.json"))
    tar_uri = normalize(join(job.shards, f"{shard_name(shard)}.tar"))
    rows, rejected = [], []
    with ShardWriter(storage, job.shards, shard) as w:
        for i, slot in enumerate(slots):
            key, uri = sample_key(shard, i), join(job.image_folder, slot["image"])
            img = _load(storage, uri, job.image_size)
            row = {"url": uri, "key": key, "caption": _caption(slot["entries"])}
            if not isinstance(img, StoredImage):
                w.write_failure(row, "failed_to_import", f"{img[0]}: {img[1]}")
                rejected += [_rejected(e["index"], e["id"], *img) for e in slot["entries"]]
                continue
            size = dict(
                width=img.width,
                height=img.height,
                original_width=img.original_width,
                original_height=img.original_height,
            )
            sha = hashlib.sha256(img.data).hexdigest()
            w.write(
                {**row, **size, "sha256": sha}, img.data, img.ext, {"source_image": slot["image"]}
            )
            rows += [
                instruction_row(
                    id=e["id"], key=key, shard=tar_uri, kind=e["kind"], conversations=e["turns"]
                )
                for e in slot["entries"]
            ]
        write_instruction_table(storage, join(job.table, f"{shard_name(shard)}.parquet"), rows)
        kinds = Counter(r["kind"] for r in rows)
        return w.close(  # the stats, written last, mark the shard (tar, index, table) done
            rows=len(rows),
            caption_rows=kinds["caption"],
            conversation_rows=kinds["conversation"],
            rejected=rejected,
        )


def _caption(entries: list[dict[str, Any]]) -> str:
    """The shard's .txt: the image's first caption, if an entry is one."""
    return next((e["turns"][1]["value"] for e in entries if e["kind"] == "caption"), "")


def _load(storage: Storage, uri: str, image_size: int | None) -> StoredImage | tuple[str, str]:
    """The image to store, or (rejection kind, detail)."""
    try:
        data = storage.read_bytes(uri)
    except OSError as e:  # FileNotFoundError locally; S3 says "Path does not exist"
        if not storage.exists(uri):
            return "missing_image", f"no file {uri}"
        return "unreadable_image", f"{type(e).__name__}: {e}"
    keep = ImageOptions(resize_mode="no", keep_original=True, extract_exif=False)
    if image_size is not None:  # shrink only; squaring is the model's preprocessing, not ours
        keep = ImageOptions(
            image_size=image_size,
            resize_mode="keep_ratio_largest",
            resize_only_if_bigger=True,
            keep_original=True,
            extract_exif=False,
        )
    try:
        return process_image(data, keep)
    except ImageError as e:
        return "unreadable_image", f"{e} ({uri})"


@register
class ImportInstructions(Stage):
    type = "import_instructions"
    version = "1"
    description = "A LLaVA JSON/JSONL file and its images into shards and an instruction table."
    Params = ImportInstructionsParams
    outputs = {"shards": "shards", "instructions": "table"}
    resources = Resources(cpus=1, workers=0)
    resumable = True  # finished shards (with their _stats.json) are kept and skipped

    def run(self, ctx: StageContext) -> None:
        p: ImportInstructionsParams = ctx.params
        data = ctx.storage.read_bytes(p.file)
        _same_file_as_before(ctx, hashlib.sha256(data).hexdigest())
        plan = plan_import(data, p.file, p)
        del data
        job = ImportJob(
            ctx.work("plans"),
            p.image_folder,
            ctx.outputs["shards"],
            ctx.outputs["instructions"],
            p.image_size,
            ctx.storage,
        )
        for i, slots in enumerate(plan.shards):  # a shard done by an earlier attempt needs none
            if not ctx.storage.exists(stats_uri(job.shards, i)):
                ctx.storage.write_json(join(job.plans, f"{shard_name(i)}.json"), slots)
        ctx.storage.makedirs(job.shards)
        ctx.storage.makedirs(job.table)
        print(f"[{ctx.stage}] {plan.entries} entries -> {len(plan.shards)} shards", flush=True)
        stats = map_shards(
            import_shard,
            list(range(len(plan.shards))),
            job.shards,
            args=(job,),
            **ctx.resources.shard_tasks(),
            desc=ctx.stage,
            samples_per_shard=p.samples_per_shard,
            num_samples=sum(map(len, plan.shards)),
            storage=ctx.storage,
        )
        _report(ctx, p, plan, stats)


def _same_file_as_before(ctx: StageContext, digest: str) -> None:
    """Shards of an interrupted attempt are kept: a rerun must plan from the same file."""
    marker = ctx.work("source.json")
    before = ctx.storage.read_json_if_exists(marker)
    if before is None:
        ctx.storage.write_json(marker, {"sha256": digest})
    elif before["sha256"] != digest:
        raise RuntimeError(
            f"{ctx.params.file} changed since the interrupted attempt; "
            f"delete {os.path.dirname(ctx.work_uri)} and rerun"
        )


def _report(ctx: StageContext, p: ImportInstructionsParams, plan: Plan, stats: list) -> None:
    rejected = sorted(
        plan.rejected + [r for s in stats for r in s["rejected"]], key=lambda r: r["index"]
    )
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
    ctx.storage.write_atomic(join(ctx.outputs["instructions"], REJECTED_FILE), lines.encode())
    by_kind = Counter(r["kind"] for r in rejected)
    total = lambda k: sum(s.get(k, 0) for s in stats)  # noqa: E731
    metrics = {
        "entries": plan.entries,
        "imported": total("rows"),
        "caption_rows": total("caption_rows"),
        "conversation_rows": total("conversation_rows"),
        "images": total("successes"),
        "rejected_total": len(rejected),
        **{f"rejected_{k}": by_kind[k] for k in REJECTED_KINDS},
    }
    ctx.log_metrics(metrics)
    names = [f"{shard_name(i)}.tar" for i in range(len(stats))]
    ctx.record_output(
        "shards",
        num_samples=metrics["images"],
        num_shards=len(stats),
        shards=names,
        format="img2dataset",
        source=p.image_folder,
    )
    ctx.record_output(
        "instructions",
        num_rows=metrics["imported"],
        num_files=len(stats),
        format=TABLE_FORMAT,
        source=p.file,
        rejected=dict(by_kind),
    )
    print(
        f"[{ctx.stage}] imported {metrics['imported']} of {plan.entries} entries "
        f"({metrics['images']} images); rejected {dict(by_kind) or 0}, listed in {REJECTED_FILE}",
        flush=True,
    )
    if p.preview and metrics["images"]:
        log_preview(ctx, ctx.outputs["shards"], p.preview)
