"""``import_shards``: bring existing WebDataset / img2dataset shards into a pipeline, checked.

``source`` is a folder of ``.tar`` shards, a brace pattern (``.../{00000..00099}.tar``) or a
glob, local or ``s3://``. One Ray task per source shard streams it and writes a new shard into
the stage's own, content-addressed output, keys and image bytes unchanged, in img2dataset's
layout: ``{i:05d}.tar`` (the i-th source shard in name order), ``{i:05d}.parquet`` (always
written, also when the source has none) and ``{i:05d}_stats.json``.

Why copy instead of pointing at the source: the output is then immutable (the source may be
rewritten or deleted later, while the committed fingerprint would still claim it), every shard
downstream is whole (a truncated source tar is cut at its last good sample), and the index is
ours to write. The cost is one read and one write of the data.

Nothing in a source shard fails the stage, and reading one is bounded (see
``mmflow/data/webdataset_io.py``). A sample with no image, no caption (with
``require_caption``), an image that does not decode whole, broken json, a key seen twice, a
member over ``max_member_bytes``, a sparse, link or device member, a key that is not a plain
UTF-8 file name (``..``, absolute, with a ``/``), a compressed tar that inflates past its bound,
or a truncated or non-tar file is a Parquet row with status ``failed_to_import`` and
``error_message`` ``kind: detail`` (naming the member and the source tar); the source index's own failure rows (img2dataset's failed downloads) are kept
as they are; a row the source index lists as a success but the tar lacks is
``missing_from_tar``. Bad keys are listed by kind in the manifest and the metrics count them.
"""

from __future__ import annotations

import os

from pydantic import Field, field_validator

from mmflow.data.ingest_import import LISTED_BAD_KEYS, ImportJob, import_shard
from mmflow.data.ingest_sources import expand_uris
from mmflow.data.preview import log_preview
from mmflow.data.shards import map_shards, shard_name
from mmflow.data.webdataset_io import DEFAULT_MAX_MEMBER_BYTES
from mmflow.params import required_field, required_text
from mmflow.stage import Params, Resources, Stage, StageContext, register

NO_SOURCE = (
    "no source: set source to a folder, brace pattern or glob of .tar shards, "
    "e.g. --set STAGE.params.source='s3://bucket/laion/{00000..00099}.tar'"
)


class ImportShardsParams(Params):
    source: str | None = required_field("folder, brace pattern or glob of .tar shards (or s3://)")
    check_images: bool = Field(True, description="decode every image; undecodable = bad sample")
    require_caption: bool = Field(True, description="a sample without .txt is a bad sample")
    max_pixels: int = Field(89_478_485, ge=1, description="larger images are bad samples")
    max_member_bytes: int = Field(
        DEFAULT_MAX_MEMBER_BYTES,
        ge=1 << 10,
        description="larger tar members are bad samples, never read; also bounds the inflation "
        "of a compressed tar",
    )
    preview: int = Field(32, ge=0, le=256, description="images in the MLflow grid")

    @field_validator("source")
    @classmethod
    def _required(cls, v: str | None) -> str:
        return required_text(v, NO_SOURCE)


@register
class ImportShards(Stage):
    type = "import_shards"
    version = "2"  # 2: bounded reading; unsafe keys, links, sparse and oversized members refused
    description = "Validate and copy existing WebDataset/img2dataset shards into the pipeline."
    Params = ImportShardsParams
    outputs = {"shards": "shards"}
    resources = Resources(cpus=1, workers=0)
    resumable = True  # finished shards (with their _stats.json) are kept and skipped

    def run(self, ctx: StageContext) -> None:
        import ray

        p: ImportShardsParams = ctx.params
        sources, missing = expand_uris(ctx.storage, p.source, (".tar",))
        if not sources:
            raise FileNotFoundError(f"source {p.source!r} matches no .tar files")
        if missing:  # e.g. a shard img2dataset never wrote: report it, import the rest
            print(f"[{ctx.stage}] {len(missing)} named shards do not exist: {missing[:5]}")
        folder = ctx.outputs["shards"]
        ctx.storage.makedirs(folder)
        _same_sources_as_before(ctx, sources)
        print(f"[{ctx.stage}] importing {len(sources)} shards from {p.source}", flush=True)
        job = ImportJob(
            ray.put(sources),
            folder,
            ctx.storage,
            p.check_images,
            p.require_caption,
            p.max_pixels,
            p.max_member_bytes,
        )
        stats = map_shards(
            import_shard,
            list(range(len(sources))),
            folder,
            args=(job,),
            **ctx.resources.shard_tasks(),
            desc=ctx.stage,
            storage=ctx.storage,
        )
        _report(ctx, p, stats, missing)


def _same_sources_as_before(ctx: StageContext, sources: list[str]) -> None:
    """Output shard i is source tar i: a rerun must see the same tars, or shards would mix."""
    marker = ctx.work("sources.json")
    before = ctx.storage.read_json_if_exists(marker)
    if before is None:
        ctx.storage.write_json(marker, sources)
    elif before != sources:
        raise RuntimeError(
            f"the tars matching {ctx.params.source} changed since the interrupted attempt; "
            f"delete {os.path.dirname(ctx.work_uri)} and rerun"
        )


def _report(
    ctx: StageContext, p: ImportShardsParams, stats: list[dict], missing: list[str]
) -> None:
    ok = sum(s["successes"] for s in stats)
    total = lambda k: sum(s.get(k, 0) for s in stats)  # noqa: E731
    bad: dict[str, list[str]] = {}
    for s in stats:
        for kind, keys in s.get("bad_keys", {}).items():
            listed = bad.setdefault(kind, [])
            listed.extend(keys[: LISTED_BAD_KEYS - len(listed)])
    metrics = {
        "num_samples": ok,
        "num_rows": total("count"),
        "num_bad": total("num_bad"),
        "source_failures": total("source_failures"),
        "truncated_shards": total("truncated"),
        "unindexed_shards": sum(1 for s in stats if not s.get("indexed")),
        "missing_shards": len(missing),
        "bytes": total("bytes"),
        **{f"errors.{k}": total(f"bad.{k}") for k in sorted(bad)},
    }
    ctx.log_metrics(metrics)
    ctx.record_output(
        "shards",
        num_samples=ok,
        num_shards=len(stats),
        shards=[f"{shard_name(i)}.tar" for i in range(len(stats))],
        format="img2dataset",
        source=p.source,
        bad_samples=bad,
        missing_shards=missing[:LISTED_BAD_KEYS],
    )
    counts = ", ".join(f"{k}={total(f'bad.{k}')}" for k in sorted(bad))
    print(
        f"[{ctx.stage}] imported {ok} samples from {len(stats)} shards; "
        f"{metrics['num_bad']} bad" + (f" ({counts})" if counts else ""),
        flush=True,
    )
    if p.preview and ok:
        log_preview(ctx, ctx.outputs["shards"], p.preview)
