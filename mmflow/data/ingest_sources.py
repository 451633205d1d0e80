"""Where ingest input comes from: file patterns, and URL lists read as a stream and cut into shards.

``expand_uris`` turns what a user writes into files: one file, a folder (its files of the
wanted types), a glob (``parts/*.parquet``, ``**`` for any depth) or a brace pattern
(``{00000..00099}.tar``, ``{a,b}``), on a local disk or ``s3://``.

A URL list (Parquet, CSV, TSV, JSONL or plain text, optionally ``.gz``) is read batch by batch
and never whole, so memory does not grow with its length: ``split_url_list`` writes it out as
one small Parquet file per shard of ``samples_per_shard`` rows, with standard column names
(``url``, ``caption``, the kept extra columns by their own names, and ``__hash`` for a hash to
verify). Row order is kept, so a row's shard and position, and so its key, depend only on the
list and ``samples_per_shard``.

Types: Parquet columns keep their types. CSV, TSV, JSONL and text have none to keep, so every
kept column is read as text (a number-looking column that turns into words half-way through a
50 GB list must not fail the ingest).

Bad rows: a CSV/TSV row with the wrong number of fields (a stray tab, an unquoted comma), a
kept value that is not UTF-8, a JSONL line that is not a JSON object, never stop the ingest.
Each keeps its place in the list (so later keys do not move) as a row without a URL whose
``__error`` column says ``bad_row: {file} line {n}: {why}``; the shard task records it as a
``failed_to_download`` row with that message, counted under ``errors.bad_row``. The message
names the file and the physical line, never the row's content.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mmflow.data.list_rows import ERROR, Readable, TextRows
from mmflow.storage import Storage, filesystem, is_remote, join, normalize

LIST_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "txt",
}
HASH = "__hash"
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class ListSpec:
    """Which columns of a URL list to read, and how."""

    url_col: str = "url"
    caption_col: str | None = "caption"
    extra_columns: tuple[str, ...] = ()
    hash_col: str | None = None
    input_format: str = "auto"  # or parquet / csv / tsv / jsonl / txt
    column_names: tuple[str, ...] | None = None  # for CSV / TSV without a header line

    def wanted(self) -> dict[str, str]:
        """Source column -> standard name."""
        cols = {self.url_col: "url"}
        if self.caption_col:
            cols[self.caption_col] = "caption"
        cols.update({c: c for c in self.extra_columns})
        if self.hash_col:
            cols[self.hash_col] = HASH
        return cols


@dataclass
class SplitInfo:
    num_rows: int
    num_shards: int
    sources: list[dict] = field(default_factory=list)  # uri and size of every input file


# ---- patterns ----------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` -> a1b a2b a3b (zero padding kept: ``{008..010}``); ``{x,y}`` -> x y."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def expand_uris(
    storage: Storage, pattern: str, exts: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """(files found, files named but missing). Folders give their files ending in ``exts``."""
    found: list[str] = []
    missing: list[str] = []
    for one in expand_braces(pattern.strip()):
        if any(c in one for c in "*?["):
            found += _glob(storage, one)
        elif storage.is_dir(one):
            found += [
                f.uri
                for f in storage.ls(one)
                if not f.is_dir and f.name.endswith(exts) and not f.name.startswith(("_", "."))
            ]
        elif storage.exists(one):
            found.append(normalize(one))
        else:
            missing.append(normalize(one))
    return sorted(dict.fromkeys(found)), missing


def _glob(storage: Storage, pattern: str) -> list[str]:
    """Files matching a glob; ``*`` in a folder part or ``**`` lists below it recursively."""
    pattern = normalize(pattern)
    sep = "/" if is_remote(pattern) else os.sep
    first = min(i for i, c in enumerate(pattern) if c in "*?[")
    base = pattern[: pattern.rfind(sep, 0, first)] or sep
    rel_pattern = pattern[len(base) :].lstrip(sep)
    deep = sep in rel_pattern or "**" in rel_pattern
    out = []
    for f in storage.ls(base, recursive=deep):
        name = f.name.replace("\\", "/")
        if f.is_dir or posixpath.basename(name).startswith(("_", ".")):
            continue
        if fnmatch.fnmatchcase(name, rel_pattern.replace("\\", "/").replace("**/", "*")):
            out.append(f.uri)
    return out


# ---- reading URL lists ---------------------------------------------------------------------------


def list_format(uri: str, input_format: str = "auto") -> str:
    if input_format != "auto":
        return input_format
    name = uri.lower().removesuffix(".gz")
    for ext, fmt in LIST_FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise ValueError(
        f"{uri}: cannot tell the format from the name; set input_format "
        f"(one of {', '.join(sorted(set(LIST_FORMATS.values())))})"
    )


def iter_url_batches(
    storage: Storage, uri: str, spec: ListSpec, batch_rows: int = 8192
) -> Iterator[pa.Table]:
    """The list's rows, a batch at a time, with standard column names (see the module doc)."""
    fmt = list_format(uri, spec.input_format)
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(storage.open_input(uri))
        if uri.lower().endswith(".gz") and fmt != "parquet":
            raw = stack.enter_context(pa.CompressedInputStream(raw, "gzip"))
        if fmt == "parquet":
            batches = _parquet_batches(raw, uri, spec, batch_rows)
        elif fmt in ("csv", "tsv"):
            batches = _csv_batches(raw, uri, spec, fmt, batch_rows)
        elif fmt == "jsonl":
            batches = _jsonl_batches(raw, uri, spec, batch_rows)
        elif fmt == "txt":
            batches = _txt_batches(raw, batch_rows)
        else:
            raise ValueError(f"{uri}: unknown input_format {fmt!r}")
        for table in batches:
            if table.num_rows:
                if ERROR not in table.column_names:  # every format: one schema for all files
                    table = table.append_column(ERROR, pa.nulls(table.num_rows, pa.string()))
                yield table


def _renamed(table: pa.Table, spec: ListSpec, typed: bool) -> pa.Table:
    wanted = spec.wanted()
    cols, names = [], []
    for src, std in wanted.items():
        col = table.column(src)
        if std in ("url", "caption", HASH) or not typed:
            col = col.cast(pa.string())
        cols.append(col)
        names.append(std)
    return pa.Table.from_arrays(cols, names=names)


def _check_columns(uri: str, have: list[str], spec: ListSpec) -> None:
    absent = [c for c in spec.wanted() if c not in have]
    if absent:
        hint = (
            " (set caption_col: null for a list without captions)"
            if spec.caption_col in absent
            else ""
        )
        raise ValueError(
            f"{uri}: no column {', '.join(map(repr, absent))}; its columns are "
            f"{', '.join(have[:40])}{hint}"
        )


def _parquet_batches(raw, uri: str, spec: ListSpec, batch_rows: int) -> Iterator[pa.Table]:
    pf = pq.ParquetFile(raw)
    _check_columns(uri, pf.schema_arrow.names, spec)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(spec.wanted())):
        yield _renamed(pa.Table.from_batches([batch]), spec, typed=True)


def _csv_batches(raw, uri: str, spec: ListSpec, fmt: str, batch_rows: int) -> Iterator[pa.Table]:
    """Python's csv reader, not pyarrow's: pyarrow fails a whole block on one non-UTF-8 value
    or one row with a field too many, with a message naming neither file nor line. Bytes that
    are not UTF-8 come through as surrogates (``surrogateescape``) and make their row bad."""
    text = io.TextIOWrapper(
        Readable(raw), encoding="utf-8-sig", errors="surrogateescape", newline=""
    )
    reader = (
        csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE)  # TSV has no quoting
        if fmt == "tsv"
        else csv.reader(text)  # quoted captions may span lines
    )
    names = list(spec.column_names) if spec.column_names else next(reader, None)
    if names is None:
        return
    _check_columns(uri, names, spec)
    wanted = spec.wanted()
    where = [names.index(c) for c in wanted]
    rows = TextRows(uri, [*wanted.values()])
    line = reader.line_num
    while True:
        start = line + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            line = reader.line_num
            rows.bad(start, f"unreadable: {e}")
            continue
        line = reader.line_num
        if not fields:
            continue  # a blank line
        if len(fields) != len(names):
            stray = "tab" if fmt == "tsv" else "comma or quote"
            rows.bad(start, f"{len(fields)} fields, not {len(names)} (a stray {stray}?)")
        else:
            rows.add(start, [fields[i] for i in where], list(wanted))
        if len(rows) >= batch_rows:
            yield rows.table()
    yield rows.table()


def _jsonl_batches(raw, uri: str, spec: ListSpec, batch_rows: int) -> Iterator[pa.Table]:
    wanted = spec.wanted()
    text = io.TextIOWrapper(Readable(raw), encoding="utf-8", errors="surrogateescape")
    rows = TextRows(uri, [*wanted.values()])
    for number, line in enumerate(text, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.bad(number, f"not JSON ({e.msg})")
        else:
            if not isinstance(obj, dict):
                rows.bad(number, "not a JSON object")
            else:
                values = [obj.get(c) for c in wanted]
                values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
                rows.add(number, values, list(wanted))
        if len(rows) >= batch_rows:
            yield rows.table()
    yield rows.table()


def _txt_batches(raw, batch_rows: int) -> Iterator[pa.Table]:
    text = io.TextIOWrapper(Readable(raw), encoding="utf-8", errors="replace")
    urls: list[str] = []
    for line in text:
        if line.strip():
            urls.append(line.strip())
        if len(urls) >= batch_rows:
            yield pa.table({"url": pa.array(urls, pa.string())})
            urls = []
    yield pa.table({"url": pa.array(urls, pa.string())})


# ---- cutting a list into shard inputs --------------------------------------------------------------


def shard_input_uri(folder: str, shard: int) -> str:
    return join(folder, f"{shard:05d}.parquet")


def split_url_list(
    storage: Storage, uris: list[str], spec: ListSpec, samples_per_shard: int, folder: str
) -> SplitInfo:
    """Write the rows of ``uris`` (in order) as ``{folder}/{shard:05d}.parquet`` inputs.

    Holds at most one shard and one batch of rows in memory. Every later batch is cast to the
    first one's schema, so all shards share one (a type clash names the file and column)."""
    info = SplitInfo(0, 0)
    schema: pa.Schema | None = None
    pending: list[pa.Table] = []
    buffered = 0
    for uri in uris:
        info.sources.append({"uri": uri, "size": file_size(uri)})
        for table in iter_url_batches(storage, uri, spec, min(samples_per_shard, 65536)):
            if schema is None:
                schema = table.schema
            table = _conform(table, schema, uri)
            pending.append(table)
            buffered += table.num_rows
            while buffered >= samples_per_shard:
                whole = pa.concat_tables(pending)
                _write_shard(storage, folder, info.num_shards, whole.slice(0, samples_per_shard))
                info.num_shards += 1
                rest = whole.slice(samples_per_shard)
                pending, buffered = ([rest] if rest.num_rows else []), rest.num_rows
            info.num_rows += table.num_rows
    if buffered:
        _write_shard(storage, folder, info.num_shards, pa.concat_tables(pending))
        info.num_shards += 1
    return info


def _conform(table: pa.Table, schema: pa.Schema, uri: str) -> pa.Table:
    if table.schema.equals(schema):
        return table
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as e:
        raise ValueError(
            f"{uri}: its columns do not match the first file's ({schema}); {e}"
        ) from None


def _write_shard(storage: Storage, folder: str, shard: int, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table.combine_chunks(), buf)
    storage.write_atomic(shard_input_uri(folder, shard), buf.getvalue())


def file_size(uri: str) -> int:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).size or 0
