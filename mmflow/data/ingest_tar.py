"""A tar writer with webdataset's ``TarWriter`` layout, on the stdlib alone.

Importing webdataset imports torch: about 5 s of CPU and 650 MB of memory in every process that
writes a shard. An ingest worker needs neither, so its ``ShardWriter`` gets this writer instead
(``tar_writer=SampleTarWriter``). Members are what webdataset writes: ``{key}.{ext}`` in sorted
extension order, mode 0444, owner ``bigdata``, a streamed (``w|``) tar.
"""

from __future__ import annotations

import io
import tarfile
import time
from typing import IO, Any


class SampleTarWriter:
    def __init__(self, stream: IO[bytes]):
        self.tar = tarfile.open(fileobj=stream, mode="w|")  # noqa: SIM115 - closed by close()

    def write(self, sample: dict[str, Any]) -> int:
        """``{"__key__": key, ext: bytes, ...}`` -> one member per extension; returns the bytes."""
        key, total, now = sample["__key__"], 0, time.time()
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            data = sample[ext]
            data = data.encode() if isinstance(data, str) else bytes(data)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), now, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))
            total += len(data)
        return total

    def close(self) -> None:
        self.tar.close()
