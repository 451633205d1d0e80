"""One shard of ``ingest_urls``: its input rows -> ``{shard}.tar`` / ``.parquet`` / ``_stats.json``.

Runs inside a Ray task (``map_shards``). The rows go through a bounded thread pool
(``run_bounded``): each thread fetches a URL (``http_fetch``: deadline per attempt, retries)
and turns the bytes into a stored image (``ingest_images``); the task's own thread writes
results as they complete through ``ShardWriter``, which publishes the tar, the Parquet index
and, last, the stats file that marks the shard done. So a killed task leaves no visible
partial file, and a rerun redoes exactly the shards without stats.

A shard that raises (a storage hiccup, say) is retried ``shard_retries`` times in the task;
Ray retries a task whose worker died. With ``previous`` (``retry_failed_from``) the successes
of the earlier ingest are copied from its tar, bytes untouched, its failures of kinds outside
``retry_kinds`` are copied as they are, and only the rest is fetched again.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow.parquet as pq

from mmflow.data.http_fetch import Fetcher, FetchError, FetchOptions
from mmflow.data.ingest_images import ImageError, ImageOptions, StoredImage, process_image
from mmflow.data.ingest_pool import PixelBudget, run_bounded
from mmflow.data.ingest_sources import ERROR, HASH, shard_input_uri
from mmflow.data.ingest_tar import SampleTarWriter
from mmflow.data.shards import ShardWriter, index_rows, shard_name
from mmflow.data.webdataset_io import iter_shard
from mmflow.progress import say
from mmflow.storage import Storage, join

# Failures worth another try later: the server or the network may behave next time.
RETRY_KINDS = (
    "timeout",
    "connection",
    "protocol",
    "dns_again",
    "stalled",
    "http_408",
    "http_429",
    "http_5xx",
)
IMAGE_FACTS = ("width", "height", "original_width", "original_height", "exif", "sha256")
DOWNLOAD, RESIZE = "failed_to_download", "failed_to_resize"  # img2dataset's statuses


class ListMismatch(ValueError):
    """``retry_failed_from`` points at an ingest of another list; retrying cannot help."""


@dataclass(frozen=True)
class ShardConfig:
    """What a shard task needs to know; plain data, so a worker imports no stage code."""

    samples_per_shard: int
    threads: int
    fetch: FetchOptions
    image: ImageOptions
    hash_type: str = "sha256"
    retry_kinds: tuple[str, ...] = RETRY_KINDS  # with ``previous``: error kinds to fetch again
    shard_retries: int = 2
    max_pixels_in_flight: int = 1 << 28  # decoded pixels held at once by a task's threads


@dataclass(frozen=True)
class ShardJob:
    inputs: str  # folder of shard inputs ({shard}.parquet, from split_url_list)
    folder: str  # output folder
    previous: str | None  # shards folder of an earlier ingest of the same list
    config: ShardConfig
    storage: Storage


@dataclass
class Outcome:
    image: StoredImage | None = None
    sha256: str | None = None
    status: str = "success"
    error: str | None = None  # "kind: message"
    downloaded: int = 0


def key_for(shard: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: shard * 10**digits + index, over 5 + digits zero-padded digits."""
    digits = math.ceil(math.log10(samples_per_shard)) if samples_per_shard > 1 else 0
    return f"{shard * 10**digits + index:0{5 + digits}d}"


def hard_limit(f: FetchOptions) -> float:
    """Longest a row can legitimately take: every attempt, every pause, and time to decode."""
    pauses = sum(min(f.retry_backoff * 2**i, 60.0) for i in range(f.retries))
    return (f.retries + 1) * f.timeout + pauses + 30.0


def ingest_shard(shard: int, job: ShardJob) -> dict[str, Any]:
    """The Ray task: one shard, retried in place when it raises (a dead worker: Ray retries)."""
    attempts = job.config.shard_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return _ingest(shard, job, attempt)
        except ListMismatch:
            raise
        except Exception as e:
            if attempt == attempts:
                raise
            say(f"[ingest] shard {shard_name(shard)} attempt {attempt} failed: {e!r}; retrying")
            time.sleep(min(2**attempt, 30))
    raise AssertionError("unreachable")


def _ingest(shard: int, job: ShardJob, attempt: int) -> dict[str, Any]:
    c = job.config
    with job.storage.open_input(shard_input_uri(job.inputs, shard)) as f:
        table = pq.read_table(f)
    internal = ("url", "caption", HASH, ERROR)
    extra = {f.name: f.type for f in table.schema if f.name not in internal}
    keys = [key_for(shard, i, c.samples_per_shard) for i in range(table.num_rows)]
    rows = {k: {**r, "key": k} for k, r in zip(keys, table.to_pylist(), strict=True)}
    del table
    tally = Counter()
    messages: Counter = Counter()
    fetcher = Fetcher(c.fetch)
    work = partial(_fetch_row, fetcher, c.image, c.hash_type, PixelBudget(c.max_pixels_in_flight))
    limit = hard_limit(c.fetch)
    try:
        with ShardWriter(job.storage, job.folder, shard, extra, SampleTarWriter) as w:
            handled = _reuse_previous(w, job, shard, rows, messages, tally)
            todo = [r for k, r in rows.items() if k not in handled]
            for row, out in run_bounded(todo, work, c.threads, limit):
                _write(w, row, _outcome(out, limit), messages, tally)
            return w.close(
                failed_to_download=w.status[DOWNLOAD],
                failed_to_resize=w.status[RESIZE],
                top_errors=dict(messages.most_common(20)),
                shard_attempt=attempt,
                **tally,
            )
    finally:
        fetcher.close()


def _fetch_row(
    fetcher: Fetcher, opts: ImageOptions, hash_type: str, budget: PixelBudget | None, row: dict
) -> Outcome:
    """Runs in a pool thread: URL -> stored image, or the reason it failed. Never raises."""
    if row.get(ERROR):  # a row of the list that could not be read (ingest_sources)
        return Outcome(status=DOWNLOAD, error=row[ERROR])
    url = (row.get("url") or "").strip()
    if not url:
        return Outcome(status=DOWNLOAD, error="invalid_url: empty URL")
    try:
        got = fetcher.get(url)
    except FetchError as e:
        return Outcome(status=DOWNLOAD, error=f"{e.kind}: {e.message}")
    expected = (row.get(HASH) or "").strip().lower()
    if expected and hashlib.new(hash_type, got.data).hexdigest() != expected:
        return Outcome(status=DOWNLOAD, error=f"hash_mismatch: {hash_type} differs from the list's")
    try:
        img = process_image(got.data, opts, budget)
    except ImageError as e:
        return Outcome(status=RESIZE, error=f"{e.kind}: {e.message}", downloaded=len(got.data))
    return Outcome(img, hashlib.sha256(img.data).hexdigest(), downloaded=len(got.data))


def _outcome(out: Any, limit: float) -> Outcome:
    """What the pool gave back -> an Outcome (a given-up row, or a bug, are failures too)."""
    if isinstance(out, Outcome):
        return out
    if out is None:
        return Outcome(status=DOWNLOAD, error=f"stalled: no result within {limit:.0f}s; given up")
    traceback.print_exception(out)  # a bug: loud in the log, but one row, not the shard
    return Outcome(status=DOWNLOAD, error=f"internal: {type(out).__name__}: {out}"[:300])


def _write(w: ShardWriter, row: dict, out: Outcome, messages: Counter, tally: Counter) -> None:
    base = _base(row)
    tally["downloaded_bytes"] += out.downloaded
    if out.image is not None:
        img = out.image
        facts = {
            "width": img.width,
            "height": img.height,
            "original_width": img.original_width,
            "original_height": img.original_height,
            "exif": img.exif,
            "sha256": out.sha256,
        }
        w.write({**base, **facts}, img.data, img.ext)
        return
    w.write_failure(base, out.status, out.error or "unknown: no message")
    messages[_pattern(out.error or "")] += 1
    tally["stalled"] += (out.error or "").startswith("stalled")


def _reuse_previous(
    w: ShardWriter, job: ShardJob, shard: int, rows: dict, messages: Counter, tally: Counter
) -> set[str]:
    """Copy what an earlier ingest already settled; returns the keys written."""
    if not job.previous:
        return set()
    tar = join(job.previous, f"{shard_name(shard)}.tar")
    prev = index_rows(job.storage, tar)
    for key, old in prev.items():
        if key not in rows or old.get("url") != rows[key].get("url"):
            raise ListMismatch(
                f"retry_failed_from={job.previous}: key {key} is "
                f"{old.get('url')!r} there but {rows.get(key, {}).get('url')!r} here; "
                "use the same url_list and samples_per_shard as that ingest"
            )
    handled: set[str] = set()
    wanted = {k for k, o in prev.items() if o.get("status") == "success"}
    if wanted and job.storage.exists(tar):
        for s in iter_shard(job.storage, tar, keys=wanted):
            if s.error is None and s.key in wanted and s.key not in handled:
                facts = {c: prev[s.key].get(c) for c in IMAGE_FACTS}
                w.write({**_base(rows[s.key]), **facts}, s.image, s.image_ext or "jpg")
                handled.add(s.key)
    tally["reused"] += len(handled)
    kinds = job.config.retry_kinds
    for key, old in prev.items():
        status, error = old.get("status"), old.get("error_message") or "unknown: no message"
        if status == "success" or key in handled:
            continue
        if _retryable(error, kinds):
            tally["retried"] += 1
            continue
        w.write_failure(_base(rows[key]), status or DOWNLOAD, error)
        messages[_pattern(error)] += 1
        handled.add(key)
    return handled


def _retryable(error: str, kinds: tuple[str, ...]) -> bool:
    kind = error.split(":", 1)[0].strip()
    for k in kinds:
        if k == "all" or k == kind or (k.endswith("xx") and kind.startswith(k[:-2])):
            return True
    return False


def _base(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in (HASH, ERROR)}


def _pattern(error: str) -> str:
    """An error with the numbers of its message folded (sizes, ports), so alike ones count as one."""
    kind, sep, message = error.partition(":")
    return (kind + sep + re.sub(r"\d+", "N", message))[:160]
