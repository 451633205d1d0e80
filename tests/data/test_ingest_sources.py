"""ingest_sources: patterns, every URL-list format, and the streaming cut into shard inputs."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmflow.data.ingest_sources import (
    ListSpec,
    expand_braces,
    expand_uris,
    iter_url_batches,
    shard_input_uri,
    split_url_list,
)
from mmflow.storage import Storage

ROWS = [{"url": f"http://h/{i}.jpg", "caption": f'cap, "{i}"', "score": i / 10} for i in range(5)]


def test_expand_braces():
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("plain") == ["plain"]


def test_expand_uris_folder_glob_and_brace(tmp_path):
    for name in ("00000.tar", "00001.tar", "00003.tar", "_tmp.tar", ".hidden.tar", "x.parquet"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "00009.tar").write_bytes(b"x")
    st = Storage()
    names = lambda uris: [os.path.relpath(u, tmp_path) for u in uris]  # noqa: E731
    found, missing = expand_uris(st, str(tmp_path), (".tar",))
    assert names(found) == ["00000.tar", "00001.tar", "00003.tar"] and missing == []
    found, _ = expand_uris(st, str(tmp_path / "0000[01].tar"), (".tar",))
    assert names(found) == ["00000.tar", "00001.tar"]
    found, _ = expand_uris(st, str(tmp_path / "**" / "*.tar"), (".tar",))
    assert "sub/00009.tar" in names(found) and "_tmp.tar" not in names(found)
    found, missing = expand_uris(st, str(tmp_path / "{00000..00003}.tar"), (".tar",))
    assert names(found) == ["00000.tar", "00001.tar", "00003.tar"]
    assert names(missing) == ["00002.tar"]


def write_list(tmp_path, fmt: str) -> str:
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt == "csv":
        pa.csv.write_csv(pa.Table.from_pylist(ROWS), path)
    elif fmt == "tsv":  # CC12M style: no header line
        path.write_text("".join(f"{r['url']}\t{r['caption']}\n" for r in ROWS))
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    elif fmt == "txt":
        path.write_text("".join(r["url"] + "\n" for r in ROWS))
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl.gz", "txt"])
def test_every_list_format_reads_the_same_rows(tmp_path, fmt):
    import pyarrow.csv  # noqa: F401  (write_list uses pa.csv)

    spec = ListSpec(extra_columns=("score",) if fmt in ("parquet", "csv", "jsonl.gz") else ())
    if fmt == "tsv":
        spec = ListSpec(column_names=("url", "caption"))
    if fmt == "txt":
        spec = ListSpec(caption_col=None)
    table = pa.concat_tables(iter_url_batches(Storage(), write_list(tmp_path, fmt), spec))
    assert table.column("url").to_pylist() == [r["url"] for r in ROWS]
    if fmt != "txt":
        assert table.column("caption").to_pylist() == [r["caption"] for r in ROWS]
    if "score" in table.column_names:  # parquet keeps types; text formats give text
        got = table.column("score").to_pylist()
        assert [float(v) for v in got] == [r["score"] for r in ROWS]
        assert all(isinstance(v, float if fmt == "parquet" else str) for v in got)


def test_a_missing_column_is_named_with_the_columns_there(tmp_path):
    path = write_list(tmp_path, "parquet")
    with pytest.raises(ValueError, match=r"no column 'TEXT'.*url, caption, score"):
        list(iter_url_batches(Storage(), path, ListSpec(caption_col="TEXT")))


def test_quoted_csv_captions_may_span_lines(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text('url,caption\nhttp://a/1.jpg,"two\nlines"\nhttp://a/2.jpg,plain\n')
    table = pa.concat_tables(iter_url_batches(Storage(), str(path), ListSpec()))
    assert table.column("caption").to_pylist() == ["two\nlines", "plain"]


def test_split_keeps_order_across_files_and_cuts_even_shards(tmp_path):
    for part in range(2):
        rows = [{"url": f"u{part}-{i}", "caption": "c", "n": part * 100 + i} for i in range(13)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"part{part}.parquet")
    out = str(tmp_path / "shards")
    uris, _ = expand_uris(Storage(), str(tmp_path / "*.parquet"), (".parquet",))
    info = split_url_list(Storage(), uris, ListSpec(extra_columns=("n",)), 7, out)
    assert (info.num_rows, info.num_shards) == (26, 4)
    shards = [pq.read_table(shard_input_uri(out, s)) for s in range(4)]
    assert [t.num_rows for t in shards] == [7, 7, 7, 5]
    assert shards[0].schema.field("n").type == pa.int64()
    urls = [u for t in shards for u in t.column("url").to_pylist()]
    assert urls == [f"u{p}-{i}" for p in range(2) for i in range(13)]


def test_a_type_clash_between_files_is_named(tmp_path):
    pq.write_table(pa.table({"url": ["a"], "caption": ["c"], "n": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"url": ["b"], "caption": ["c"], "n": ["x"]}), tmp_path / "b.parquet")
    uris, _ = expand_uris(Storage(), str(tmp_path), (".parquet",))
    with pytest.raises(ValueError, match="b.parquet"):
        split_url_list(Storage(), uris, ListSpec(extra_columns=("n",)), 10, str(tmp_path / "o"))
