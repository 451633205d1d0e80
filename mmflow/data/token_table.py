"""The token table: the Parquet format ``pretokenize`` writes and the model stages read.

Columns ``key``, ``caption``, ``text_ids`` (list<int32>), ``image_tokens`` (list<int32>,
row-major over the grid), ``grid_h``, ``grid_w``; every file's key-value metadata
(``mmflow.*`` keys) names the VQ-GAN, its codebook and grid and the text tokenizer, so a
reader (pyarrow, pandas, duckdb, the training stages, ``mmflow decode``) needs nothing else.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mmflow.storage import Storage

META_PREFIX = "mmflow."


def token_schema(metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The table's columns, with ``metadata`` as ``mmflow.*`` key-value pairs (strings)."""
    fields = [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("text_ids", pa.list_(pa.int32())),
        ("image_tokens", pa.list_(pa.int32())),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
    ]
    meta = {f"{META_PREFIX}{k}": str(v) for k, v in (metadata or {}).items() if v is not None}
    return pa.schema(fields, metadata=meta or None)


def read_metadata(schema: pa.Schema) -> dict[str, str]:
    """The ``mmflow.*`` metadata of a token table file's schema, without the prefix."""
    raw = schema.metadata or {}
    return {
        k.decode()[len(META_PREFIX) :]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(META_PREFIX)
    }


def table_files(uri: str) -> list[str]:
    """The table's Parquet files under ``uri``, sorted (the order pyarrow and pandas read them in)."""
    return sorted(f.uri for f in Storage().ls(uri) if f.name.endswith(".parquet") and not f.is_dir)


def dataset_of(files: list[str]):
    """A pyarrow dataset over these Parquet files (local or ``s3://``), in this order."""
    import pyarrow.dataset as pads

    from mmflow.storage import filesystem

    fs, _ = filesystem(files[0])
    return pads.dataset([filesystem(f)[1] for f in files], filesystem=fs, format="parquet")


def open_table(uri: str, required: tuple[str, ...] = ()):
    """(pyarrow dataset over the table's files in name order, its ``mmflow.*`` metadata, the
    files' URIs); a folder with no Parquet file, or metadata without one of ``required``, is a
    clear error."""
    files = table_files(uri)
    if not files:
        raise FileNotFoundError(f"no Parquet files in {uri} (a pretokenize `tokens` output?)")
    dataset = dataset_of(files)
    meta = read_metadata(dataset.schema)
    for needed in required:
        if needed not in meta:
            raise ValueError(f"{uri}: the table's metadata has no {needed!r}")
    return dataset, meta, files


def longest_text(dataset) -> int:
    """The most caption ids any row has (at least 1)."""
    import pyarrow.compute as pc

    col = dataset.to_table(["text_ids"])["text_ids"]
    return int(pc.max(pc.list_value_length(col)).as_py() or 1)
