"""Reading img2dataset / WebDataset shards sample by sample, keeping the original bytes.

A shard is a tar whose members are grouped by key (the file name up to its
first dot): ``{key}.jpg``, ``{key}.txt``, ``{key}.json``. :func:`iter_shard`
streams one and yields a :class:`Sample` per key. Nothing in a shard is fatal:
a sample with a problem is still yielded, with ``error`` set to a short reason
(``missing_image``, ``corrupt_json`` ...), and a tar that breaks off mid-way
(``corrupt_tar``) ends the shard after one error sample naming where it broke.
Decoding images is left to the caller, so the bytes stay untouched.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mmflow.storage import Storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


def iter_shard(storage: Storage, uri: str, keys: set[str] | None = None) -> Iterator[Sample]:
    """The samples of one tar shard in order; with ``keys``, only those (others are skipped unread).

    A tar that ends early at a member boundary reads as a shorter shard (tarfile
    cannot tell); compare with the shard's parquet index to catch that."""
    index, current, members = 0, None, {}
    with storage.open_input(uri) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = split_name(info.name)
                    if key != current:
                        if current is not None:
                            if keys is None or current in keys:
                                yield _sample(current, index, members)
                            index += 1
                        current, members = key, {}
                    if keys is None or key in keys:
                        members[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            # the sample being read when the tar broke off is the corrupt one
            name = current if current is not None else f"{posixpath.basename(uri)}#{index}"
            yield Sample(name, index, error=f"corrupt_tar: {type(e).__name__}: {e}"[:200])
            return
    if current is not None and (keys is None or current in keys):
        yield _sample(current, index, members)


def _sample(key: str, index: int, members: dict[str, bytes]) -> Sample:
    s = Sample(key, index)
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
