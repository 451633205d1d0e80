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


def _errors(table: pa.Table) -> dict[int, str]:
    """Position in the list -> the bad-row message."""
    return {i: e for i, e in enumerate(table.column("__error").to_pylist()) if e}


def test_bad_tsv_rows_past_the_first_block_are_counted_rows(tmp_path):
    """A stray tab and a latin-1 caption, 5 MB into a CC12M-style TSV (pyarrow's blocks are
    4 MB): each is a bad row in place, naming file and line; every other row is read."""
    good = [f"http://h/{i}.jpg\tcaption number {i:06d} with some words\n" for i in range(100_000)]
    lines = [line.encode() for line in good]
    lines[90_000] = b"http://h/stray.jpg\tcap\twith a tab\n"
    lines[95_000] = b"http://h/latin.jpg\tcaf\xe9 au lait\n"
    path = tmp_path / "cc12m.tsv"
    path.write_bytes(b"".join(lines))
    spec = ListSpec(column_names=("url", "caption"))
    table = pa.concat_tables(iter_url_batches(Storage(), str(path), spec, batch_rows=8192))
    assert table.num_rows == 100_000
    errors = _errors(table)
    assert set(errors) == {90_000, 95_000}
    assert errors[90_000] == f"bad_row: {path} line 90001: 3 fields, not 2 (a stray tab?)"
    assert errors[95_000] == f"bad_row: {path} line 95001: column 'caption' is not UTF-8"
    urls = table.column("url").to_pylist()
    assert urls[90_000] is None and urls[89_999] == "http://h/89999.jpg"
    assert urls[99_999] == "http://h/99999.jpg"


def test_bad_csv_rows_name_their_physical_line(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes(
        b'url,caption\nhttp://a/1.jpg,"two\nlines"\nhttp://a/2.jpg,"bad \xff byte"\n'
        b"http://a/3.jpg,a,b\n\nhttp://a/4.jpg,fine\n"
    )
    table = pa.concat_tables(iter_url_batches(Storage(), str(path), ListSpec()))
    assert table.column("url").to_pylist() == ["http://a/1.jpg", None, None, "http://a/4.jpg"]
    assert _errors(table) == {
        1: f"bad_row: {path} line 4: column 'caption' is not UTF-8",
        2: f"bad_row: {path} line 5: 3 fields, not 2 (a stray comma or quote?)",
    }


def test_bad_jsonl_lines_are_rows_too(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_bytes(
        b'{"url": "u1", "caption": "c"}\n{broken\n[1, 2]\n{"url": "u2", "caption": "\xe9"}\n'
    )
    table = pa.concat_tables(iter_url_batches(Storage(), str(path), ListSpec()))
    assert table.column("url").to_pylist() == ["u1", None, None, None]
    errors = _errors(table)
    assert errors[1].startswith(f"bad_row: {path} line 2: not JSON")
    assert errors[2] == f"bad_row: {path} line 3: not a JSON object"
    assert errors[3] == f"bad_row: {path} line 4: column 'caption' is not UTF-8"
