"""Reading text URL lists row by row: a pyarrow stream as a Python text stream, and a batch of
rows that keeps bad rows in place, each with where it was and why it is bad (see
:mod:`mmflow.data.ingest_sources`)."""

from __future__ import annotations

import io

import pyarrow as pa

ERROR = "__error"  # why a list row is unusable (a bad row), or null


class TextRows:
    """A batch of text rows under standard names, bad rows in place (see the module doc)."""

    def __init__(self, uri: str, names: list[str]):
        self.uri, self.names = uri, names
        self.columns: dict[str, list] = {n: [] for n in [*names, ERROR]}

    def __len__(self) -> int:
        return len(self.columns[ERROR])

    def add(self, line: int, values: list[str | None], sources: list[str]) -> None:
        for v, src in zip(values, sources, strict=True):
            if v is not None and not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    self.bad(line, f"column {src!r} is not UTF-8")
                    return
        for n, v in zip(self.names, values, strict=True):
            self.columns[n].append(v)
        self.columns[ERROR].append(None)

    def bad(self, line: int, why: str) -> None:
        for n in self.names:
            self.columns[n].append(None)
        self.columns[ERROR].append(f"bad_row: {self.uri} line {line}: {why}"[:300])

    def table(self) -> pa.Table:
        out = pa.table({n: pa.array(v, pa.string()) for n, v in self.columns.items()})
        self.columns = {n: [] for n in self.columns}
        return out


class Readable(io.RawIOBase):
    """A pyarrow stream as a Python raw stream, so TextIOWrapper can read it line by line."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.stream.read(len(b))
        b[: len(data)] = data
        return len(data)
