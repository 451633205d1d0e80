"""A local copy of a model folder or checkpoint file that lives in storage.

Workers load models with libraries that want local paths (open_clip, torch,
transformers, tokenizers). A local URI is used in place; a remote one is
downloaded once per machine into a cache private to the user (mode 0700, under
``$MMFLOW_CACHE`` or ``~/.cache/mmflow/models``). The cache key covers the URI *and*
what is there now (each file's name, size and modification time), so a folder
replaced at the same URI is fetched again rather than served stale (on S3, whose
LastModified has whole seconds, a rewrite within the same second of the same sizes is
not seen; stage outputs are never rewritten in place: a forced re-execution builds aside). Concurrent
callers, processes or threads, race safely: each downloads into a temporary folder
of its own and the first rename wins.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid

import pyarrow.fs as pafs

from mmflow.storage import Storage, filesystem, is_remote, normalize


def cache_root() -> str:
    root = os.environ.get("MMFLOW_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mmflow", "models"
    )
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def _signature(uri: str) -> str:
    """What identifies the content at ``uri`` without reading it: each file's path, size and
    modification time (S3's LastModified)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such model folder or file")
    if info.type == pafs.FileType.File:
        entries = [info]
    else:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    listing = sorted((e.path, e.size, e.mtime_ns) for e in entries if e.type == pafs.FileType.File)
    if not listing:
        raise FileNotFoundError(f"{uri}: empty model folder")
    return repr(listing)


def materialize(uri: str, storage: Storage | None = None) -> str:
    """A local path for the model folder or file at ``uri``: itself when local, else a cached copy."""
    uri = normalize(uri)
    if not is_remote(uri):
        return uri
    storage = storage or Storage()
    key = hashlib.sha256(f"{uri}\n{_signature(uri)}".encode()).hexdigest()[:24]
    cache = os.path.join(cache_root(), key)
    local = os.path.join(cache, os.path.basename(uri.rstrip("/")))
    if not os.path.exists(os.path.join(cache, "_DONE")):
        tmp = f"{cache}.{uuid.uuid4().hex}.tmp"  # one per caller, threads included
        if storage.is_dir(uri):
            storage.download_dir(uri, os.path.join(tmp, os.path.basename(local)))
        else:
            os.makedirs(tmp, exist_ok=True)
            with open(os.path.join(tmp, os.path.basename(local)), "wb") as f:
                f.write(storage.read_bytes(uri))
        open(os.path.join(tmp, "_DONE"), "w").close()
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return local
