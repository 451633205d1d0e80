"""One source shard of ``import_shards``: stream a WebDataset / img2dataset tar, check every
sample, and write it again as a whole img2dataset shard (keys and image bytes unchanged).

Runs in a Ray task; lives apart from the stage module so that a worker imports no stage code.
What counts as a bad sample is listed in ``mmflow/stages/import_shards.py``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from mmflow.data.ingest_images import ImageError, check_image
from mmflow.data.ingest_tar import SampleTarWriter
from mmflow.data.shards import ShardWriter, extra_columns, index_rows
from mmflow.data.webdataset_io import DEFAULT_MAX_MEMBER_BYTES, Sample, iter_shard
from mmflow.storage import Storage

FAILED = "failed_to_import"
INT_COLUMNS = ("width", "height", "original_width", "original_height")
LISTED_BAD_KEYS = 100  # per kind and shard, and in the manifest
CUT_KINDS = ("corrupt_tar", "compression_bomb")  # errors that end a source shard early


@dataclass(frozen=True)
class ImportJob:
    sources: Any  # list of tar URIs, or a Ray reference to it (one copy for all tasks)
    folder: str
    storage: Storage
    check_images: bool = True
    require_caption: bool = True
    max_pixels: int = 89_478_485
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES


def import_shard(shard: int, job: ImportJob) -> dict[str, Any]:
    """One source tar -> one checked output shard (a Ray task)."""
    sources = job.sources if isinstance(job.sources, list) else _get(job.sources)
    src, storage = sources[shard], job.storage
    index, extra = index_rows(storage, src), extra_columns(storage, [src])
    seen: set[str] = set()
    bad: dict[str, list[str]] = {}
    tally: Counter = Counter()
    with ShardWriter(storage, job.folder, shard, extra, SampleTarWriter) as w:
        names = w.schema.names
        for s in iter_shard(storage, src, max_member_bytes=job.max_member_bytes):
            row = _row(s, index.get(s.key), names)
            problem = _problem(s, seen, job)
            seen.add(s.key)
            if problem:
                w.write_failure(row, FAILED, problem)
                _note(bad, tally, problem.split(":")[0], s.key)
                continue
            w.write(row, s.image, s.image_ext, extra_json=_extra_meta(s.meta, names))
            tally["unindexed"] += bool(index) and s.key not in index
        for key, old in index.items():
            if key in seen:
                continue
            if old.get("status") == "success":
                w.write_failure(_clean(old, names), FAILED, "missing_from_tar: in the index only")
                _note(bad, tally, "missing_from_tar", key)
            else:  # the source's own failure rows (e.g. img2dataset's failed downloads)
                tally["source_failures"] += 1
                w.write_failure(
                    _clean(old, names),
                    old.get("status") or "failed_to_download",
                    old.get("error_message") or "unknown: no message",
                )
        return w.close(source=src, indexed=bool(index), bad_keys=bad, **tally)


def _note(bad: dict[str, list[str]], tally: Counter, kind: str, key: str) -> None:
    """Count a bad sample under its kind; list its key while the list is short."""
    tally[f"bad.{kind}"] += 1
    tally["num_bad"] += 1
    tally["truncated"] |= kind in CUT_KINDS
    keys = bad.setdefault(kind, [])
    if len(keys) < LISTED_BAD_KEYS:
        keys.append(key)


def _get(ref: Any) -> list[str]:
    import ray

    return ray.get(ref)


def _problem(s: Sample, seen: set[str], job: ImportJob) -> str | None:
    """Why a sample cannot be used, as ``kind: detail``; None when it is whole."""
    if s.key in seen:
        return "duplicate_key: the key appears again later in the tar"
    if s.error:
        kind, _, detail = s.error.partition(":")
        return f"{kind}: {detail.strip() or kind.replace('_', ' ')}"
    if job.require_caption and s.caption is None:
        return "missing_caption: no .txt member"
    if job.check_images:
        try:
            check_image(s.image, job.max_pixels)
        except ImageError as e:
            return f"{e.kind}: {e.message}"
    return None


def _row(s: Sample, indexed: dict | None, names: list[str]) -> dict[str, Any]:
    """The output row: the source index's, else the sample json's, with the tar's caption."""
    row = _clean(indexed or s.meta, names)
    row["key"] = s.key
    if s.caption is not None:
        row["caption"] = s.caption
    return row


def _clean(values: dict, names: list[str]) -> dict[str, Any]:
    """Schema columns only, base columns typed (a json may hold "256" for a width)."""
    row = {c: values.get(c) for c in names if c in values and c not in ("status", "error_message")}
    for c in INT_COLUMNS:
        try:
            row[c] = None if row.get(c) is None else int(row[c])
        except (TypeError, ValueError):
            row[c] = None
    for c in ("url", "caption", "exif", "sha256", "key"):
        if row.get(c) is not None and not isinstance(row[c], str):
            row[c] = str(row[c])
    return row


def _extra_meta(meta: dict, names: list[str]) -> dict[str, Any]:
    """Fields of the source json beyond the schema: kept in the output json."""
    return {k: v for k, v in meta.items() if k not in names}
