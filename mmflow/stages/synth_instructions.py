"""``synth_instructions``: LLaVA instruction data about synthetic shapes, answers from ground truth.

Input: shards whose sample json carries the scene under ``synth`` (``synth_shapes``, or
``clip_filter``'s kept shards of it). One Ray task per shard writes one table file, named like
the shard (``00003.parquet`` for ``00003.tar``, see ``mmflow/data/instructions.py``) with, per
image:

- with ``captions``, one ``caption`` row (stage 1, alignment): a brief-description request and
  a TRUE caption of the scene, drawn from the scene itself, never the shard's caption (a share
  of those deliberately describe another picture);
- ``conversations_per_image`` ``conversation`` rows (stage 2, instruction tuning): ``turns_min``
  to ``turns_max`` questions of random types with canonical answers.

Everything is a function of (seed, sample key), so rows do not change with the sharding. A
sample that cannot be read or has no ``synth`` json is counted by reason and skipped
(``skipped_no_ground_truth``, ``skipped_<read error kind>``). Tasks are resumable per shard:
a shard's stats file (in ``_work``, so the table folder holds only table files) marks it done.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from mmflow.data.instructions import (
    QUESTION_TYPES,
    TABLE_FORMAT,
    caption_conversation,
    instruction_row,
    key_rng,
    make_conversation,
    scene_caption,
    table_file_name,
    write_instruction_table,
)
from mmflow.data.shards import list_shards, map_shards, stats_uri
from mmflow.data.webdataset_io import iter_shard
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.storage import Storage, join, normalize


class SynthInstructionsParams(Params):
    conversations_per_image: int = Field(1, ge=0, le=16, description="conversation rows per image")
    turns_min: int = Field(2, ge=1, le=len(QUESTION_TYPES), description="QA turns, at least")
    turns_max: int = Field(4, ge=1, le=len(QUESTION_TYPES), description="QA turns, at most")
    captions: bool = Field(True, description="also one stage-1 caption row per image")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SynthInstructionsParams:
        if self.turns_min > self.turns_max:
            raise ValueError(f"turns_min {self.turns_min} > turns_max {self.turns_max}")
        if not self.captions and self.conversations_per_image == 0:
            raise ValueError("no rows: set captions or conversations_per_image > 0")
        return self


@dataclass(frozen=True)
class SynthJob:
    shards: list[str]  # input tar URIs, normalised
    folder: str  # the table output
    done: str  # where per-shard stats go (marks a shard finished)
    params: SynthInstructionsParams
    storage: Storage


def rows_for(key: str, shard: str, scene: dict[str, Any], p: SynthInstructionsParams) -> list:
    """The table rows of one image (a function of seed and key only)."""
    rng = key_rng(key, p.seed)
    rows = []
    if p.captions:
        conversation = caption_conversation(scene_caption(scene, rng), rng)
        rows.append(
            instruction_row(
                id=f"{key}-caption",
                key=key,
                shard=shard,
                kind="caption",
                conversations=conversation,
                qtypes=["caption"],
                scene=scene,
            )
        )
    for j in range(p.conversations_per_image):
        conversation, qtypes = make_conversation(scene, rng, (p.turns_min, p.turns_max))
        rows.append(
            instruction_row(
                id=f"{key}-conv{j}",
                key=key,
                shard=shard,
                kind="conversation",
                conversations=conversation,
                qtypes=qtypes,
                scene=scene,
            )
        )
    return rows


def write_table_shard(shard: int, job: SynthJob) -> dict[str, Any]:
    """One input shard -> one table file (a Ray task)."""
    tar = job.shards[shard]
    rows, tally = [], Counter()
    for s in iter_shard(job.storage, tar):
        scene = s.meta.get("synth") if s.error is None else None
        if s.error is not None:
            tally[f"skipped_{s.error.split(':')[0]}"] += 1
        elif not isinstance(scene, dict) or not scene.get("objects"):
            tally["skipped_no_ground_truth"] += 1
        else:
            rows += rows_for(s.key, tar, scene, job.params)
            tally["images"] += 1
    write_instruction_table(job.storage, join(job.folder, table_file_name(tar)), rows)
    for r in rows:
        tally[f"{r['kind']}_rows"] += 1
        if r["kind"] == "conversation":
            tally.update(f"qtype_{q}" for q in r["qtypes"])
    stats = {"count": len(rows), "rows": len(rows), **tally}
    job.storage.write_json(stats_uri(job.done, shard), stats)  # last: the shard is done
    return stats


@register
class SynthInstructions(Stage):
    type = "synth_instructions"
    version = "1"
    description = "LLaVA caption and multi-turn QA rows about synth_shapes scenes (ground truth)."
    Params = SynthInstructionsParams
    inputs = {"shards": "shards"}
    outputs = {"instructions": "table"}
    resources = Resources(cpus=1, workers=0)  # workers=0: as many shard tasks as the cluster fits
    resumable = True  # finished table files (stats in _work) are kept and skipped

    def run(self, ctx: StageContext) -> None:
        p: SynthInstructionsParams = ctx.params
        shards = [normalize(u) for u in list_shards(ctx.storage, ctx.inputs["shards"].uri)]
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {ctx.inputs['shards'].uri}")
        folder = ctx.outputs["instructions"]
        ctx.storage.makedirs(folder)
        job = SynthJob(shards, folder, ctx.work("done"), p, ctx.storage)
        stats = map_shards(
            write_table_shard,
            list(range(len(shards))),
            job.done,
            args=(job,),
            **ctx.resources.shard_tasks(),
            desc=ctx.stage,
            storage=ctx.storage,
        )
        total = Counter()
        for s in stats:
            total.update({k: v for k, v in s.items() if isinstance(v, int)})
        if not total["images"]:  # a wiring mistake (e.g. web shards), not a bad sample
            raise RuntimeError(
                f"no sample in {ctx.inputs['shards'].uri} carries synth ground truth "
                f"({dict(total)}); synth_instructions reads synth_shapes shards"
            )
        skipped = {k: v for k, v in total.items() if k.startswith("skipped_")}
        metrics = {
            "rows": total["rows"],
            "caption_rows": total["caption_rows"],
            "conversation_rows": total["conversation_rows"],
            "images": total["images"],
            "skipped_total": sum(skipped.values()),
            **skipped,
            **{f"qtype_{q}": total[f"qtype_{q}"] for q in QUESTION_TYPES},
        }
        ctx.log_metrics(metrics)
        ctx.record_output(
            "instructions",
            num_rows=total["rows"],
            num_files=len(shards),
            format=TABLE_FORMAT,
            shards=shards,
            skipped=skipped,
        )
        example = _first_conversation(ctx.storage, folder, shards)
        print(
            f"[{ctx.stage}] {total['rows']} rows about {total['images']} images from "
            f"{len(shards)} shards; skipped {skipped or 0}; e.g. {example}",
            flush=True,
        )


def _first_conversation(storage: Storage, folder: str, shards: list[str]) -> str:
    """A sample row for the log, so a run shows what it made."""
    import pyarrow.parquet as pq

    with storage.open_input(join(folder, table_file_name(shards[0]))) as f:
        rows = pq.read_table(f, columns=["conversations"]).to_pylist()
    if not rows:
        return "-"
    return " | ".join(t["value"].replace("\n", " ") for t in json.loads(rows[-1]["conversations"]))
