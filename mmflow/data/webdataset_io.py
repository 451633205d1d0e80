"""Reading img2dataset / WebDataset shards sample by sample, keeping the original bytes.

A shard is a tar whose members are grouped by key (the file name up to its
first dot): ``{key}.jpg``, ``{key}.txt``, ``{key}.json``. :func:`iter_shard`
streams one and yields a :class:`Sample` per key. Nothing in a shard is fatal:
a sample with a problem is still yielded, with ``error`` set to a short reason
(``missing_image``, ``corrupt_json`` ...), and a tar that breaks off mid-way
(``corrupt_tar``) ends the shard after one error sample naming where it broke.
Decoding images is left to the caller, so the bytes stay untouched.

A shard may come from anywhere (``import_shards``), so reading it is bounded:

- a member is read into memory only when it is a regular file of at most ``max_member_bytes``
  (``member_too_large``); GNU sparse members (a few KB in the tar, any size once expanded:
  ``sparse_member``), symbolic and hard links (``link_member``) and devices or fifos
  (``special_member``) are never read; a tar header that asks for more than the limit (a giant
  long name or pax record) ends the shard as ``corrupt_tar``;
- a compressed tar (gzip, bzip2, xz) is inflated by this module, at most ``max_member_bytes``
  plus ``MAX_INFLATE_RATIO`` times the compressed bytes read; past that the shard ends
  (``compression_bomb``). Image data does not compress, so real shards stay near 1:1;
- keys that would not be plain file names when written back (``..``, absolute, with a ``/``:
  ``unsafe_key``) or are not UTF-8 (``non_utf8_name``) are refused.

Every such error names the member and the tar.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from mmflow.storage import Storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
# Inflated bytes per compressed byte a tar may reach (beyond max_member_bytes). Image shards are
# near 1:1 and tars of tiny samples below 30:1; deflate reaches 1032:1 on zeros, bzip2 far more.
MAX_INFLATE_RATIO = 200
_CHUNK = 1 << 20
_HEADER_SLACK = 1 << 16  # tarfile reads headers (512 B, pax records) with the same read()


@dataclass
class Sample:
    key: str
    index: int  # position in the shard, counting every key (good or bad)
    image: bytes | None = None
    image_ext: str | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the sample's .json
    error: str | None = None  # why the sample cannot be used; None when it is whole


def split_name(name: str) -> tuple[str, str]:
    """``dir/000010003.jpg`` -> (``dir/000010003``, ``jpg``): WebDataset's key/extension rule."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def iter_shard(
    storage: Storage,
    uri: str,
    keys: set[str] | None = None,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[Sample]:
    """The samples of one tar shard in order; with ``keys``, only those (others are skipped unread).

    A tar that ends early at a member boundary reads as a shorter shard (tarfile
    cannot tell); compare with the shard's parquet index to catch that."""
    index, current, shown, members, problem = 0, None, "", {}, None
    with storage.open_input(uri) as raw:
        try:
            with _open_tar(raw, max_member_bytes) as tar:
                for info in tar:
                    if info.isdir():
                        continue
                    name = info.name
                    while name.startswith("./"):  # `tar -C dir .` writes ./000.jpg
                        name = name[2:]
                    key, ext = split_name(name)
                    if key != current:
                        if current is not None:
                            if keys is None or current in keys:
                                yield _sample(shown, index, members, problem)
                            index += 1
                        current, members = key, {}
                        shown, problem = _key_problem(key, info.name, uri)
                    if problem or (keys is not None and key not in keys):
                        continue
                    problem = _member_problem(info, uri, max_member_bytes)
                    if problem is None:
                        members[ext] = tar.extractfile(info).read()
        except _Refused as e:
            where = shown if current is not None else f"{posixpath.basename(uri)}#{index}"
            yield Sample(where, index, error=f"{e.kind}: {e} in {uri}"[:300])
            return
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            # the sample being read when the tar broke off is the corrupt one
            where = shown if current is not None else f"{posixpath.basename(uri)}#{index}"
            yield Sample(where, index, error=f"corrupt_tar: {type(e).__name__}: {e}"[:200])
            return
    if current is not None and (keys is None or current in keys):
        yield _sample(shown, index, members, problem)


def _key_problem(key: str, name: str, uri: str) -> tuple[str, str | None]:
    """(the key as it may be shown and stored, why it is refused or None)."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # tarfile decodes names with surrogateescape
        shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        member = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return shown, f"non_utf8_name: member {member!r} of {uri} is not UTF-8"[:300]
    why = None
    if not key:
        why = "has an empty key"
    elif key.startswith("/"):
        why = "is an absolute path"
    elif ".." in key.split("/"):
        why = "leaves its folder (..)"
    elif "/" in key:
        why = "has a key with a '/' (written back, it would be a folder)"
    return key, (f"unsafe_key: member {name!r} of {uri} {why}"[:300] if why else None)


def _member_problem(info: tarfile.TarInfo, uri: str, limit: int) -> str | None:
    """Why a member is not read, as ``kind: detail``; None for a regular file within the limit."""
    if info.issparse():
        kind, why = "sparse_member", f"is a GNU sparse file ({info.size} bytes expanded)"
    elif info.issym() or info.islnk():
        kind, why = "link_member", f"is a {'symbolic' if info.issym() else 'hard'} link"
    elif not info.isfile():
        kind, why = "special_member", "is not a regular file"
    elif info.size > limit:
        kind, why = "member_too_large", f"is {info.size} bytes, over max_member_bytes={limit}"
    else:
        return None
    return f"{kind}: member {info.name!r} of {uri} {why}"[:300]


def _sample(key: str, index: int, members: dict[str, bytes], problem: str | None) -> Sample:
    s = Sample(key, index)
    if problem:
        s.error = problem
        return s
    for ext in IMAGE_EXTS:
        if ext in members:
            s.image, s.image_ext = members[ext], ext
            break
    try:
        s.caption = members["txt"].decode("utf-8") if "txt" in members else None
    except UnicodeDecodeError:
        s.error = "corrupt_caption"
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
        s.meta = meta if isinstance(meta, dict) else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        s.error = s.error or "corrupt_json"
    if s.image is None:
        s.error = s.error or "missing_image"
    return s


# -- bounded reading ---------------------------------------------------------------------------


class _Refused(Exception):
    """A read the limits do not allow; ends the shard."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _RawFile(io.RawIOBase):
    """A pyarrow input file as a raw stream, so that ``io.BufferedReader`` can batch its reads
    (each read of an S3 file is a request)."""

    def __init__(self, f: Any):
        self.f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()


def _open_tar(raw: Any, limit: int) -> tarfile.TarFile:
    buffered = io.BufferedReader(_RawFile(raw), buffer_size=_CHUNK)
    magic = buffered.peek(6)[:6]
    inflated: IO[bytes] | None = None  # closed with the input file
    if magic.startswith(b"\x1f\x8b"):
        inflated = gzip.GzipFile(fileobj=buffered, mode="rb")
    elif magic.startswith(b"BZh"):
        inflated = bz2.BZ2File(buffered)  # noqa: SIM115
    elif magic.startswith(b"\xfd7zXZ\x00"):
        inflated = lzma.LZMAFile(buffered)  # noqa: SIM115
    guard = _Guard(inflated or buffered, buffered if inflated else None, limit)
    return tarfile.open(fileobj=guard, mode="r:")  # noqa: SIM115 - the caller closes it


class _Guard:
    """What tarfile reads through: no single read above the member limit, and for a compressed
    tar, no inflation past the ratio bound (forward seeks are reads, checked chunk by chunk)."""

    def __init__(self, f: IO[bytes], compressed: IO[bytes] | None, limit: int):
        self.f, self.compressed, self.limit = f, compressed, limit

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > self.limit + _HEADER_SLACK:
            raise _Refused(
                "corrupt_tar",
                f"a read of {n} bytes at offset {self.tell()} (a tar header "
                f"claiming more than max_member_bytes={self.limit})",
            )
        data = self.f.read(n)
        self._check()
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if self.compressed is None:
            return self.f.seek(pos, whence)
        cur = self.f.tell()
        target = pos if whence == 0 else cur + pos
        if whence not in (0, 1) or target < cur:
            raise OSError("a compressed tar is read forward only")
        while cur < target:
            chunk = self.f.read(min(_CHUNK, target - cur))
            if not chunk:
                break
            cur += len(chunk)
            self._check()
        return cur

    def tell(self) -> int:
        return self.f.tell()

    def _check(self) -> None:
        if self.compressed is None:
            return
        inflated, packed = self.f.tell(), self.compressed.tell()
        if inflated > self.limit + MAX_INFLATE_RATIO * packed:
            raise _Refused(
                "compression_bomb",
                f"{packed} compressed bytes inflated to {inflated} (more than "
                f"max_member_bytes={self.limit} + {MAX_INFLATE_RATIO}x); the rest is not read",
            )
