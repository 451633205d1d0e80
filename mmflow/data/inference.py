"""Batch inference over shards on Ray Data: the one block behind ``clip_filter`` and ``pretokenize``.

One streaming pipeline, the same for every model stage::

    shard URIs -> read (CPU actors, up to ``read_workers``, READ_CPUS each: a whole shard at a
                        time through iter_shard; ShardReader.row per sample, ShardReader.table per
                        chunk of ``batch_size`` rows; a bad sample raises BadSample(reason))
               -> model (an actor pool of ``resources.workers`` actors, ``resources.cpus`` and
                         ``resources.gpus`` each: ModelStep.predict on batches of ``batch_size``)
               -> Parquet under ``out_uri`` (writer tasks with no CPU reservation)

A stage supplies two small classes: a :class:`ShardReader` (sample -> row, or raise
:class:`BadSample`; rows -> Arrow table) and a :class:`ModelStep` (the columns it
consumes -> the columns it adds). Every other column of the reader's table passes
through to the output untouched, types included.

Bad samples are never fatal. Their reason is the part of the error before the
first ``:`` (``undecodable_image``, ``corrupt_json``, ``corrupt_tar``, ...); a key
that the shard's parquet index lists as a success but the tar lacks is
``missing_from_tar``. Each shard's bad samples go to ``{bad_uri}/{shard:05d}.json``,
written once the shard is read; its content depends on the shard alone, so a retried
actor rewrites the same file. With ``keep_bad_rows`` they are also rows of the
output (``ShardReader.bad_row``, ``error`` set), and the model step is told which rows
are whole; without it they are left out of the table.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmflow.data.shards import listed_keys, shard_name
from mmflow.data.webdataset_io import Sample, iter_shard
from mmflow.progress import Progress, tick
from mmflow.storage import Storage, filesystem, join

if TYPE_CHECKING:
    from mmflow.stage import Resources

READ_CPUS = 1.0  # per reading actor; the model actors take resources.cpus each
LISTED_KEYS = 100  # keys listed per reason in the report (all are counted)
MISSING_INDEX = 10**9  # index of a missing_from_tar row: after every sample the tar holds
MAX_ERROR = 300  # characters of an error kept (iter_shard's own bound)
MIN_ROWS_PER_FILE = 100_000  # without rows_per_file: few large files, not one per block


class BadSample(Exception):
    """Raised by :meth:`ShardReader.row`: the sample cannot be used, for ``reason``."""

    def __init__(self, reason: str, detail: str | None = None):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ShardReader:
    """The per-sample step, one instance per reading actor (built with ``reader_kwargs``).

    Load transforms and tokenizers in ``__init__``, once per actor. ``row`` turns a whole
    sample (one without an ``iter_shard`` error) into a row dict or raises :class:`BadSample`;
    ``table`` turns a chunk of rows into one Arrow table, the batch the model step sees; every
    chunk's table has the same schema (a kept bad row's inputs are placeholders of the real
    shape: a batch may join chunks, and tensors of two shapes do not stack)."""

    def row(self, sample: Sample, shard: int) -> dict[str, Any]:
        raise NotImplementedError

    def bad_row(self, sample: Sample, shard: int, error: str) -> dict[str, Any]:
        """With ``keep_bad_rows``: the row standing for a bad sample (``error`` must be kept)."""
        return {"key": sample.key, "shard": shard, "index": sample.index, "error": error}

    def table(self, rows: list[dict[str, Any]]) -> pa.Table:
        raise NotImplementedError


class ModelStep:
    """The model step, one instance per model actor (built with ``model_kwargs``), on
    :attr:`device`: a GPU when the actor was given one. Load the model in ``__init__``.

    ``predict`` gets the ``consumes`` columns of a batch as numpy arrays and ``ok``, a bool per
    row (False for a kept bad row, whose inputs are placeholders), and returns the columns to
    add, one value per row. The consumed columns leave the table; all others pass through."""

    consumes: ClassVar[tuple[str, ...]] = ()

    def predict(self, inputs: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, pa.Array]:
        raise NotImplementedError

    @cached_property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def tensor(self, array: np.ndarray):
        """A batch array as a tensor on the model's device."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)


@dataclass
class InferenceReport:
    """What a run wrote, and the bad samples: counted by reason, the first keys of each listed."""

    files: list[str]  # the Parquet files under out_uri, sorted (the order readers take them)
    num_rows: int
    bad: Counter = field(default_factory=Counter)  # reason -> count
    bad_keys: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys, shard order

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def bad_metrics(self) -> dict[str, int]:
        """``num_bad`` and ``bad_<reason>``, as the stages log them."""
        return {"num_bad": self.num_bad, **{f"bad_{r}": n for r, n in self.bad.items()}}


def run_inference(
    shards: list[str],
    storage: Storage,
    *,
    reader: type[ShardReader],
    reader_kwargs: dict[str, Any],
    model: type[ModelStep],
    model_kwargs: dict[str, Any],
    out_uri: str,
    bad_uri: str,
    resources: Resources,
    batch_size: int,
    read_workers: int = 1,
    schema: pa.Schema | None = None,
    rows_per_file: int | None = None,
    preserve_order: bool = False,
    keep_bad_rows: bool = False,
    desc: str = "inference",
) -> InferenceReport:
    """Run the pipeline over ``shards`` (shard ``i`` is ``shards[i]``); the table lands in
    ``out_uri`` (with ``schema`` when given: its metadata goes into every file). With
    ``rows_per_file`` every file holds that many rows but the last; with ``preserve_order``
    rows are in input order (shard, then sample), at some cost in overlap. Progress: the
    shards read, with the rows and bad samples so far, as the bar ``desc``."""
    import ray
    from ray.data import DataContext

    bar = Progress(len(shards), desc, unit="shards")
    data_ctx = DataContext.get_current()
    keep_order = data_ctx.execution_options.preserve_order
    data_ctx.execution_options.preserve_order = preserve_order or keep_order
    try:
        items = [{"shard": i, "uri": uri} for i, uri in enumerate(shards)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # CPU actors of their own (not tasks, which Ray Data would fuse into the model actors):
        # reading and inference run side by side, and the transforms are built once per actor.
        ds = ds.map_batches(
            ReadShards,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=read_workers),
            num_cpus=READ_CPUS,
            fn_constructor_kwargs={
                "reader": reader,
                "reader_kwargs": reader_kwargs,
                "storage": storage,
                "bad_uri": bad_uri,
                "chunk": batch_size,
                "keep_bad_rows": keep_bad_rows,
                "desc": desc,
            },
        )
        ds = ds.map_batches(
            RunModel,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=max(1, resources.workers)),
            num_cpus=resources.cpus,
            num_gpus=resources.gpus or None,
            fn_constructor_kwargs={
                "model": model,
                "model_kwargs": model_kwargs,
                "threads": max(1, int(resources.cpus)),
            },
        )
        fs, path = filesystem(out_uri)
        # writing is light I/O: no CPU reservation, so it never waits for the actors to let go of theirs
        ds.write_parquet(
            path,
            filesystem=fs,
            schema=schema,
            min_rows_per_file=rows_per_file or MIN_ROWS_PER_FILE,
            max_rows_per_file=rows_per_file,
            ray_remote_args={"num_cpus": 0},
        )
    finally:
        data_ctx.execution_options.preserve_order = keep_order
    bar.close()
    return _report(storage, out_uri, bad_uri, len(shards))


class ReadShards:
    """The reading actor: whole shards in, chunks of ``chunk`` rows out, bad samples recorded."""

    def __init__(
        self,
        reader: type[ShardReader],
        reader_kwargs: dict[str, Any],
        storage: Storage,
        bad_uri: str,
        chunk: int,
        keep_bad_rows: bool,
        desc: str = "inference",
    ):
        self.reader = reader(**reader_kwargs)
        self.desc = desc
        if "torch" in sys.modules:  # transforms that brought torch run on the one CPU held
            sys.modules["torch"].set_num_threads(1)
        self.storage, self.bad_uri, self.chunk = storage, bad_uri, chunk
        self.keep_bad_rows = keep_bad_rows

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for shard, uri in zip(batch["shard"].to_pylist(), batch["uri"].to_pylist(), strict=True):
            rows: list[dict[str, Any]] = []
            bad: list[dict[str, str]] = []
            count = 0
            for row in self.rows(shard, uri, bad):
                rows.append(row)
                count += 1
                if len(rows) == self.chunk:
                    yield self.reader.table(rows)
                    rows = []
            if rows:
                yield self.reader.table(rows)
            self.storage.write_json(bad_record_uri(self.bad_uri, shard), bad)
            tick(self.desc, 1, rows=count - (len(bad) if self.keep_bad_rows else 0), bad=len(bad))

    def rows(self, shard: int, uri: str, bad: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """The shard's rows in order; each bad sample is appended to ``bad`` (and yielded as a
        bad row with ``keep_bad_rows``)."""
        for s in self.samples(uri):
            try:
                if s.error:  # iter_shard's: "corrupt_json", "corrupt_tar: ReadError: ..."
                    raise BadSample(*s.error.split(": ", 1))
                yield self.reader.row(s, shard)
            except BadSample as e:
                error = str(e)[:MAX_ERROR]
                bad.append({"key": s.key, "reason": error.split(":")[0], "error": error})
                if self.keep_bad_rows:
                    yield self.reader.bad_row(s, shard, error)

    def samples(self, uri: str) -> Iterator[Sample]:
        """The tar's samples, then the keys its index lists as a success that the tar lacks."""
        listed = listed_keys(self.storage, uri)
        for s in iter_shard(self.storage, uri):
            listed.discard(s.key)
            yield s
        for i, key in enumerate(sorted(listed)):  # after the tar's own samples, by key
            yield Sample(key, MISSING_INDEX + i, error="missing_from_tar")


class RunModel:
    """The model actor: a :class:`ModelStep` on each batch; consumed columns out, its columns in."""

    def __init__(self, model: type[ModelStep], model_kwargs: dict[str, Any], threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model = model(**model_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ray.data.block import BlockAccessor

        consumes = list(self.model.consumes)
        if "error" in batch.column_names:
            ok = batch["error"].is_null().to_numpy()
        else:
            ok = np.ones(batch.num_rows, bool)
        inputs = (
            BlockAccessor.for_block(batch.select(consumes)).to_batch_format("numpy")
            if consumes
            else {}
        )
        out = batch.drop_columns(consumes)
        for name, column in self.model.predict(inputs, ok).items():
            out = out.append_column(name, column)
        return out


def bad_record_uri(bad_uri: str, shard: int) -> str:
    return join(bad_uri, f"{shard_name(shard)}.json")


def _report(storage: Storage, out_uri: str, bad_uri: str, num_shards: int) -> InferenceReport:
    files = sorted(
        f.uri for f in storage.ls(out_uri) if f.name.endswith(".parquet") and not f.is_dir
    )
    rows = 0
    for uri in files:
        with storage.open_input(uri) as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    report = InferenceReport(files, rows)
    for shard in range(num_shards):
        for b in storage.read_json(bad_record_uri(bad_uri, shard)):
            report.bad[b["reason"]] += 1
            keys = report.bad_keys.setdefault(b["reason"], [])
            if len(keys) < LISTED_KEYS:
                keys.append(b["key"])
    return report


__all__ = ["BadSample", "InferenceReport", "ModelStep", "ShardReader", "run_inference"]
