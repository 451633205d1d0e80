"""Instruction-table rows joined with their pictures: what the LLaVA stages train and evaluate on.

An instruction table (``synth_instructions`` or ``import_instructions``, schema in
:mod:`mmflow.data.instructions`) has one Parquet file per source shard and names each row's
picture by shard URI and key. Joining a table file with its shard is one sequential read of
each (no random access into tars), so the unit of work is the pair: :func:`table_pairs` lists
them, :func:`joined_rows` yields one pair's rows with the image bytes attached (a training rank
reads its share of the pairs, :meth:`mmflow.tasks.llava._ChatTask.rows`), and
:func:`heldout_rows` gathers the held-out ones for evaluation.

Rows are chosen by ``kinds`` (``caption``, ``conversation``) and by the held-out split of
their key (:mod:`mmflow.data.holdout`), the same split every stage uses. A row whose picture
is missing from its shard, or unreadable there, is counted by the caller's counter as
``missing_image`` (the table and the shard disagree) and skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mmflow.data.holdout import is_held_out
from mmflow.storage import Storage

COLUMNS = ("id", "key", "kind", "conversations", "qtypes", "scene")


def table_files(storage: Storage, table_uri: str) -> list[str]:
    """The table's Parquet files, sorted (the token table's listing); a clear error when there
    are none."""
    from mmflow.data.token_table import table_files as parquet_files

    files = parquet_files(table_uri)
    if not files:
        raise ValueError(f"no Parquet files in {table_uri} (an instruction table's output?)")
    return files


def table_pairs(storage: Storage, table_uri: str) -> list[dict[str, str]]:
    """``{"table": parquet URI, "shard": tar URI}`` for each table file (the shard named by its
    rows; a file names one shard)."""
    import pyarrow.parquet as pq

    pairs = []
    for uri in table_files(storage, table_uri):
        with storage.open_input(uri) as f:
            shards = set(pq.read_table(f, columns=["shard"])["shard"].to_pylist())
        if len(shards) > 1:
            raise ValueError(
                f"{uri}: rows name {len(shards)} shards; an instruction file names one"
            )
        if shards:
            pairs.append({"table": uri, "shard": shards.pop()})
    return pairs


def selected(key: str, kind: str, kinds: tuple[str, ...], split: str, fraction: float) -> bool:
    held = is_held_out(key, fraction)
    return kind in kinds and (held if split == "heldout" else not held)


def joined_rows(
    pair: dict[str, str],
    *,
    kinds: tuple[str, ...],
    split: str,
    holdout_fraction: float,
    storage: Storage | None = None,
    missing: list[str] | None = None,
    images: bool = True,
) -> Iterator[dict[str, Any]]:
    """The pair's chosen rows in table order, each with ``image`` (the picture's bytes) unless
    ``images`` is False (then the shard is not read). Keys of rows whose picture is not in
    the shard go to ``missing``."""
    import pyarrow.parquet as pq

    from mmflow.data.webdataset_io import iter_shard

    storage = storage or Storage()
    with storage.open_input(pair["table"]) as f:
        table = pq.read_table(f, columns=list(COLUMNS)).to_pylist()
    rows = [r for r in table if selected(r["key"], r["kind"], kinds, split, holdout_fraction)]
    if not images:
        yield from rows
        return
    if not rows:
        return
    wanted = {r["key"] for r in rows}
    images: dict[str, bytes] = {}
    for s in iter_shard(storage, pair["shard"], wanted):
        if not s.error and s.image:
            images[s.key] = s.image
    for r in rows:
        if r["key"] in images:
            yield {**r, "image": images[r["key"]]}
        elif missing is not None:
            missing.append(r["key"])


def heldout_rows(
    pairs: list[dict[str, str]],
    *,
    kinds: tuple[str, ...],
    holdout_fraction: float,
    limit: int,
    storage: Storage | None = None,
    images: bool = True,
    one_per_picture: bool = True,
) -> list[dict[str, Any]]:
    """Up to ``limit`` held-out rows of ``kinds`` in table order (the evaluation's), with their
    pictures unless ``images`` is False; with ``one_per_picture``, the first row of each."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for pair in pairs:
        for row in joined_rows(pair, kinds=kinds, split="heldout", holdout_fraction=holdout_fraction,
                               storage=storage, images=images):  # fmt: skip
            if not one_per_picture or row["key"] not in seen:
                seen.add(row["key"])
                out.append(row)
            if len(out) >= limit:
                return out
    return out
