"""One storage abstraction over local folders and s3:// (pyarrow filesystems).

Every path the runner and the stages touch is a URI string: a local path
(absolute, or relative to the working directory) or ``s3://bucket/key``.
``Storage.for_uri`` resolves it to a pyarrow filesystem once; S3 endpoints
come from the usual AWS environment (``AWS_ENDPOINT_URL`` for S3-compatible
servers such as MinIO or moto).

Writes that must never be seen half-done go through ``write_atomic`` /
``open_atomic``: the bytes land in a hidden temporary file (a ``._tmp-*`` key on
S3) that is renamed (on S3: copied server-side) into place only when the block
succeeds. On S3 the final key is never streamed to directly: pyarrow's output
stream has no abort, and a stream that is collected completes its multipart
upload, so a failed write to the final key would publish a partial object.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any

import pyarrow.fs as pafs

TMP_PREFIX = "._tmp-"
# The largest object S3 copies in one request (CopyObject); above it the temporary object is
# streamed into place instead.
S3_COPY_LIMIT = 5 << 30


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Absolute local path, or the URI unchanged for remote stores."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


@lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI."""
    uri = normalize(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    scheme, _, rest = uri.partition("://")
    if scheme != "s3":
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return _s3(endpoint, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")), rest


def _open_atomic_remote(fs: pafs.FileSystem, path: str) -> Iterator[IO[bytes]]:
    """Write to a ``._tmp-*`` key beside ``path``; copy it to ``path`` only on success.

    pyarrow's output stream cannot abort its multipart upload (no ``abort``; it completes the
    upload when closed or collected), so whatever happens to the stream, only the temporary key
    may ever hold a partial object; it is deleted on failure, and ``remove_temporaries`` deletes
    one left by a killed process. A SIGKILL before close leaves only an unfinished multipart
    upload, which is never visible as an object.
    """
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
    stream = fs.open_output_stream(tmp)
    try:
        yield stream
        size = stream.tell()
        stream.close()
        if size <= S3_COPY_LIMIT:
            fs.copy_file(tmp, path)
        else:
            with fs.open_input_stream(tmp) as src, fs.open_output_stream(path) as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
    finally:
        with contextlib.suppress(Exception):
            stream.close()  # completes the temporary object, deleted next
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)


@dataclass(frozen=True)
class FileInfo:
    uri: str
    name: str
    size: int
    is_dir: bool


class Storage:
    """File operations on URIs. Stateless; cheap to create and to pickle."""

    def exists(self, uri: str) -> bool:
        fs, path = filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        fs, path = filesystem(uri)
        return fs.get_file_info(path).type == pafs.FileType.Directory

    def makedirs(self, uri: str) -> None:
        fs, path = filesystem(uri)
        if not is_remote(normalize(uri)):
            fs.create_dir(path, recursive=True)

    def ls(self, uri: str, recursive: bool = False, temporaries: bool = False) -> list[FileInfo]:
        """Entries under a folder, sorted by name; empty when it does not exist. An atomic
        write's temporary (in flight, or left by a killed writer) is never data: it is listed
        only with ``temporaries`` (a ``._tmp-*-00003.tar`` would otherwise pass for a shard)."""
        fs, path = filesystem(uri)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        base = normalize(uri)
        out = []
        for info in infos:
            if is_remote(base):
                # The key as stored, not normalized: ``a/../b`` is a key of its own on S3.
                rel = info.path[len(path.rstrip("/")) + 1 :]
                full = f"{base.partition('://')[0]}://{info.path}"
            else:
                rel = os.path.relpath(info.path, path)
                full = join(base, rel)
            if not temporaries and posixpath.basename(rel).startswith(TMP_PREFIX):
                continue
            out.append(
                FileInfo(
                    uri=full,
                    name=rel,
                    size=info.size or 0,
                    is_dir=info.type == pafs.FileType.Directory,
                )
            )
        return sorted(out, key=lambda f: f.name)

    def read_bytes(self, uri: str) -> bytes:
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def read_json_if_exists(self, uri: str) -> Any | None:
        try:
            return self.read_json(uri)
        except (FileNotFoundError, OSError) as e:
            if (
                isinstance(e, FileNotFoundError)
                or "not found" in str(e).lower()
                or "NoSuchKey" in str(e)
            ):
                return None
            raise

    def open_input(self, uri: str) -> IO[bytes]:
        fs, path = filesystem(uri)
        return fs.open_input_file(path)

    @contextlib.contextmanager
    def open_atomic(self, uri: str) -> Iterator[IO[bytes]]:
        """A binary stream whose content becomes visible at ``uri`` only when the block succeeds."""
        uri = normalize(uri)
        fs, path = filesystem(uri)
        if is_remote(uri):
            yield from _open_atomic_remote(fs, path)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(
            os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}"
        )
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def write_atomic(self, uri: str, data: bytes) -> None:
        with self.open_atomic(uri) as f:
            f.write(data)

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def upload_file(self, local_path: str, uri: str) -> None:
        with open(local_path, "rb") as src, self.open_atomic(uri) as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)

    def upload_dir(self, local_dir: str, uri: str) -> None:
        for root, _, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, local_dir)
                self.upload_file(src, join(uri, *rel.split(os.sep)))

    def download_dir(self, uri: str, local_dir: str) -> None:
        """Copy a remote folder into ``local_dir``; refuses (``ValueError``, before writing
        anything) remote names that would land outside it (``..`` segments, absolute names)."""
        root = os.path.realpath(local_dir)
        files = []
        for info in self.ls(uri, recursive=True):
            if info.is_dir:
                continue
            dst = os.path.realpath(os.path.join(root, *info.name.split("/")))
            if not info.name or os.path.commonpath([root, dst]) != root or dst == root:
                raise ValueError(
                    f"download_dir({uri!r}): remote name {info.name!r} would land outside "
                    f"{local_dir!r}; refused"
                )
            files.append((info, dst))
        for info, dst in files:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs, path = filesystem(info.uri)
            with fs.open_input_stream(path) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, length=8 << 20)

    def delete(self, uri: str) -> None:
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    def remove_temporaries(self, uri: str) -> int:
        """Delete leftovers of interrupted atomic writes under a folder; returns how many."""
        n = 0
        for info in self.ls(uri, recursive=True, temporaries=True):
            if not info.is_dir and posixpath.basename(info.name).startswith(TMP_PREFIX):
                self.delete(info.uri)
                n += 1
        return n
