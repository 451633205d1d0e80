"""img2dataset-layout shards, and a resumable map over shards on Ray tasks.

One shard is three files in the output folder::

    {shard:05d}.tar          {key}.jpg / {key}.txt / {key}.json per successful sample
    {shard:05d}.parquet      one row per input row, failures included
    {shard:05d}_stats.json   counts and timings; written last, so it marks the shard done

Each file is published atomically, so a killed task leaves either nothing or a
whole file; a shard without its stats file is redone from scratch on the next
attempt (its work is deterministic), and a shard with one is never redone.
Keys follow img2dataset: shard number then sample number, zero-padded.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmflow.progress import Progress, brief_error
from mmflow.storage import Storage, join

# The columns img2dataset writes (for the options mmflow uses), in its order.
BASE_COLUMNS: dict[str, pa.DataType] = {
    "url": pa.string(),
    "caption": pa.string(),
    "key": pa.string(),
    "status": pa.string(),
    "error_message": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "original_width": pa.int64(),
    "original_height": pa.int64(),
    "exif": pa.string(),
    "sha256": pa.string(),
}


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def sample_key(shard: int, index: int, shard_digits: int = 5, index_digits: int = 4) -> str:
    return f"{shard:0{shard_digits}d}{index:0{index_digits}d}"


def stats_uri(folder: str, shard: int) -> str:
    return join(folder, f"{shard_name(shard)}_stats.json")


class ShardWriter:
    """Writes one shard. Use as a context manager; ``close`` publishes parquet and stats."""

    def __init__(
        self,
        storage: Storage,
        folder: str,
        shard: int,
        extra_columns: dict[str, pa.DataType] | None = None,
        tar_writer: Callable[[Any], Any] | None = None,  # stream -> TarWriter; None: webdataset's
    ):
        if tar_writer is None:
            import webdataset as wds  # imports torch: keep it off the config-validation path

            tar_writer = lambda stream: wds.TarWriter(stream, encoder=False)  # noqa: E731

        self.storage, self.folder, self.shard = storage, folder, shard
        self.schema = pa.schema({**BASE_COLUMNS, **(extra_columns or {})})
        self.rows: list[dict[str, Any]] = []
        self.status = Counter()
        self.errors = Counter()
        self.bytes = 0
        self.start = time.time()
        self._tar_ctx = storage.open_atomic(join(folder, f"{shard_name(shard)}.tar"))
        self._tar = tar_writer(self._tar_ctx.__enter__())
        self.stats: dict[str, Any] | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.stats is None:
                self.close()
        elif self.stats is None:
            self._tar.close()
            self._tar_ctx.__exit__(exc_type, exc, tb)

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        unknown = set(row) - set(self.schema.names)
        if unknown:
            raise KeyError(
                f"shard {shard_name(self.shard)}: columns {sorted(unknown)} not in the schema"
            )
        return {name: row.get(name) for name in self.schema.names}

    def write(
        self,
        row: dict[str, Any],
        image: bytes,
        image_ext: str = "jpg",
        extra_json: dict[str, Any] | None = None,
    ) -> None:
        """A successful sample: image, caption and json into the tar, a row into the parquet."""
        row = self._row({**row, "status": "success"})
        meta = {**{k: v for k, v in row.items()}, **(extra_json or {})}
        self._tar.write(
            {
                "__key__": row["key"],
                image_ext: image,
                "txt": (row["caption"] or "").encode(),
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
        )
        self.bytes += len(image)
        self.rows.append(row)
        self.status["success"] += 1

    def write_failure(self, row: dict[str, Any], status: str, error: str) -> None:
        self.rows.append(self._row({**row, "status": status, "error_message": error}))
        self.status[status] += 1
        self.errors[error.split(":")[0][:80]] += 1

    def close(self, **extra_stats: Any) -> dict[str, Any]:
        self._tar.close()
        self._tar_ctx.__exit__(None, None, None)
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.storage.write_atomic(
            join(self.folder, f"{shard_name(self.shard)}.parquet"), buf.getvalue()
        )
        end = time.time()
        stats = {
            "count": len(self.rows),
            "successes": self.status["success"],
            "failed_to_download": sum(v for k, v in self.status.items() if k != "success"),
            "failed_to_resize": 0,
            "duration": end - self.start,
            "start_time": self.start,
            "end_time": end,
            "status_dict": dict(self.status),
            "error_counts": dict(self.errors),
            "bytes": self.bytes,
            **extra_stats,
        }
        self.storage.write_json(stats_uri(self.folder, self.shard), stats)
        self.stats = stats
        return stats


def _call_shard(
    fn: Callable[..., dict[str, Any]], shard: int, args: tuple, folder: str, storage: Storage
) -> dict[str, Any]:
    """The task: a shard whose stats exist is done. Ray retries a task whose worker died, also
    one that died after writing the stats and before returning them: that retry returns them
    instead of fetching the shard again."""
    stats = storage.read_json_if_exists(stats_uri(folder, shard))
    if stats is not None:
        return stats
    return fn(shard, *args)


def map_shards(
    fn: Callable[..., dict[str, Any]],
    shards: list[int],
    folder: str,
    *,
    args: tuple = (),
    cpus: float = 1.0,
    gpus: float = 0.0,
    max_in_flight: int | None = None,
    max_retries: int = 3,
    spread: bool = False,
    desc: str = "shards",
    samples_per_shard: int | None = None,
    num_samples: int | None = None,
    storage: Storage | None = None,
) -> list[dict[str, Any]]:
    """Run ``fn(shard, *args) -> stats`` as one Ray task per shard not yet done.

    A shard is done when its stats file exists; done shards are read, not redone.
    Tasks whose worker dies (or whose node is lost) are retried by Ray up to ``max_retries``
    times, on any node that is left. ``spread``: Ray's SPREAD scheduling, tasks over all nodes.
    Progress counts shards, or with ``samples_per_shard`` samples (each task's stats ``count``):
    shard ``s`` holds that many, or fewer when ``num_samples`` (all shards together) ends inside it.
    Returns the stats of every shard, in shard order.
    """
    import ray

    storage = storage or Storage()
    done = {s: storage.read_json_if_exists(stats_uri(folder, s)) for s in shards}
    todo = [s for s in shards if done[s] is None]
    if len(todo) < len(shards):
        print(
            f"[{desc}] resuming: {len(shards) - len(todo)} of {len(shards)} shards already done",
            flush=True,
        )
    unit_total = sum(_expected(s, samples_per_shard, num_samples) for s in todo)
    progress = Progress(unit_total, desc, unit="samples" if samples_per_shard else "shards")
    remote = ray.remote(_call_shard).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_retries=max_retries,
        name=f"{desc}-shard",
        scheduling_strategy="SPREAD" if spread else "DEFAULT",
    )
    limit = max_in_flight or max(
        1, int(ray.available_resources().get("CPU", 1) // max(cpus, 0.01)) * 2
    )
    pending: dict[Any, int] = {}
    queue = list(todo)
    fn_ref = ray.put(fn)
    while queue or pending:
        while queue and len(pending) < limit:
            s = queue.pop(0)
            pending[remote.remote(fn_ref, s, args, folder, storage)] = s
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            s = pending.pop(ref)
            try:
                done[s] = ray.get(ref)
            except Exception as e:
                for r in pending:
                    ray.cancel(r)
                raise RuntimeError(f"shard {shard_name(s)} failed: {brief_error(e)}") from e
            progress.update(done[s].get("count", 1) if samples_per_shard else 1)
    if todo:
        progress.close()
    return [done[s] for s in shards]


def _expected(shard: int, samples_per_shard: int | None, num_samples: int | None) -> int:
    """The progress units of one shard: 1, or the samples it holds."""
    if not samples_per_shard:
        return 1
    if num_samples is None:
        return samples_per_shard
    return max(0, min(samples_per_shard, num_samples - shard * samples_per_shard))


def list_shards(storage: Storage, folder: str) -> list[str]:
    """URIs of the ``.tar`` shards in a folder, in order."""
    return [f.uri for f in storage.ls(folder) if f.name.endswith(".tar") and not f.is_dir]


def read_index(storage: Storage, folder: str) -> pa.Table:
    """All per-shard parquet rows of a folder as one table."""
    tables = []
    for f in storage.ls(folder):
        if f.name.endswith(".parquet"):
            with storage.open_input(f.uri) as fh:
                tables.append(pq.read_table(fh))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def index_uri(tar_uri: str) -> str:
    """``…/00012.tar`` -> ``…/00012.parquet``, the shard's index."""
    return tar_uri[: -len(".tar")] + ".parquet"


def listed_keys(storage: Storage, tar_uri: str) -> set[str]:
    """Keys the shard's index lists as downloaded; empty when there is no index."""
    uri = index_uri(tar_uri)
    if not storage.exists(uri):
        return set()
    with storage.open_input(uri) as f:
        t = pq.read_table(f, columns=["key", "status"])
    return {
        k
        for k, s in zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True)
        if s == "success"
    }


def index_rows(storage: Storage, tar_uri: str) -> dict[str, dict[str, Any]]:
    """The shard index's rows by key; empty when there is no index."""
    uri = index_uri(tar_uri)
    if not storage.exists(uri):
        return {}
    with storage.open_input(uri) as f:
        return {r["key"]: r for r in pq.read_table(f).to_pylist()}


def extra_columns(storage: Storage, shards: list[str]) -> dict[str, pa.DataType]:
    """Columns of the input index beyond img2dataset's (e.g. ``mismatched``), carried to the output."""
    for tar in shards:
        uri = index_uri(tar)
        if storage.exists(uri):
            with storage.open_input(uri) as f:
                schema = pq.read_schema(f)
            return {n: schema.field(n).type for n in schema.names if n not in BASE_COLUMNS}
    return {}
