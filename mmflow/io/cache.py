"""A local copy of a model folder or checkpoint file that lives in storage.

Workers load models with libraries that want local paths (open_clip, torch,
transformers, tokenizers). A local URI is used in place; a remote one is
downloaded once per machine into a cache private to the user (mode 0700, under
``$MMFLOW_CACHE`` or ``~/.cache/mmflow/models``). The cache key covers the URI *and*
what is there now (each file's name and size, for a folder), so a folder replaced
at the same URI (a forced re-execution) is fetched again rather than served stale.
Concurrent callers race safely: each downloads into its own temporary folder and
the first rename wins.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from mmflow.storage import Storage, is_remote, normalize


def cache_root() -> str:
    root = os.environ.get("MMFLOW_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mmflow", "models"
    )
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def _signature(uri: str, storage: Storage) -> str:
    """What identifies the content at ``uri`` without reading it: names and sizes."""
    if storage.is_dir(uri):
        listing = sorted((f.name, f.size) for f in storage.ls(uri, recursive=True) if not f.is_dir)
        if not listing:
            raise FileNotFoundError(f"{uri}: empty or missing model folder")
        return repr(listing)
    entries = [f for f in storage.ls(uri.rsplit("/", 1)[0]) if f.uri == uri]
    if not entries:
        raise FileNotFoundError(f"{uri}: no such model file")
    return repr(entries[0].size)


def materialize(uri: str, storage: Storage | None = None) -> str:
    """A local path for the model folder or file at ``uri``: itself when local, else a cached copy."""
    uri = normalize(uri)
    if not is_remote(uri):
        return uri
    storage = storage or Storage()
    key = hashlib.sha256(f"{uri}\n{_signature(uri, storage)}".encode()).hexdigest()[:24]
    cache = os.path.join(cache_root(), key)
    local = os.path.join(cache, os.path.basename(uri.rstrip("/")))
    if not os.path.exists(os.path.join(cache, "_DONE")):
        tmp = f"{cache}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
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
