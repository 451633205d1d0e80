"""The token table format: columns, ``mmflow.*`` metadata through a real Parquet file, and the
table's files in the order pyarrow reads them."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mmflow.data.token_table import read_metadata, table_files, token_schema

COLUMNS = ["key", "caption", "text_ids", "image_tokens", "grid_h", "grid_w"]


def rows(schema: pa.Schema, n: int = 2) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "key": f"{i:09d}",
                "caption": f"shape {i}",
                "text_ids": [1, 2, i],
                "image_tokens": list(range(i, i + 4)),
                "grid_h": 2,
                "grid_w": 2,
            }
            for i in range(n)
        ],
        schema=schema,
    )


def test_schema_columns_and_types():
    schema = token_schema()
    assert schema.names == COLUMNS
    assert schema.field("text_ids").type == pa.list_(pa.int32())
    assert schema.field("image_tokens").type == pa.list_(pa.int32())
    assert {schema.field(c).type for c in ("grid_h", "grid_w")} == {pa.int32()}
    assert {schema.field(c).type for c in ("key", "caption")} == {pa.string()}
    assert schema.metadata is None and read_metadata(schema) == {}


def test_metadata_round_trips_through_a_parquet_file(tmp_path):
    meta = {
        "vqgan_uri": "s3://bucket/p/vqgan_train/0123abcd/model",
        "codebook_size": 1024,
        "grid": 8,
        "tokenizer_sha256": "ab" * 32,
        "unset": None,  # None values are left out, not written as "None"
    }
    schema = token_schema(meta)
    path = str(tmp_path / "part-00000.parquet")
    pq.write_table(rows(schema), path)

    back = pq.read_schema(path)
    assert back.metadata[b"mmflow.grid"] == b"8"  # stored prefixed, as strings
    assert read_metadata(back) == {
        "vqgan_uri": "s3://bucket/p/vqgan_train/0123abcd/model",
        "codebook_size": "1024",
        "grid": "8",
        "tokenizer_sha256": "ab" * 32,
    }
    table = pq.read_table(path)
    assert table.schema.names == COLUMNS
    assert table.column("image_tokens").to_pylist() == [[0, 1, 2, 3], [1, 2, 3, 4]]
    assert read_metadata(pads.dataset(path).schema)["codebook_size"] == "1024"


def test_read_metadata_ignores_other_keys():
    schema = pa.schema(
        [("a", pa.int32())], metadata={"pandas": "{}", "mmflowx": "no", "mmflow.k": "v"}
    )
    assert read_metadata(schema) == {"k": "v"}


def test_table_files_are_the_parquet_files_in_pyarrows_order(tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    schema = token_schema({"grid": 2})
    for name in ["part-2.parquet", "part-10.parquet", "a.parquet", "part-00001.parquet"]:
        pq.write_table(rows(schema), str(folder / name))
    (folder / "_stats.json").write_text("{}")
    (folder / "notes.txt").write_text("not a table file")
    (folder / "nested.parquet").mkdir()  # a folder, even one named like a file, is skipped
    (folder / "sub").mkdir()
    pq.write_table(rows(schema), str(folder / "sub" / "deep.parquet"))  # not recursive

    files = table_files(str(folder))
    assert [os.path.basename(f) for f in files] == [
        "a.parquet",
        "part-00001.parquet",
        "part-10.parquet",
        "part-2.parquet",
    ]
    assert all(os.path.isabs(f) for f in files)
    top = pads.dataset(str(folder), format="parquet", exclude_invalid_files=False)
    assert [f for f in top.files if f.endswith(".parquet") and "/sub/" not in f] == files
    assert table_files(str(tmp_path / "missing")) == []
