"""The model cache: local URIs used in place; a folder or file on S3 (a real moto server on
loopback, the fixture of tests/test_storage.py) downloaded once into ``$MMFLOW_CACHE``, reused,
and fetched again when the content at the URI changes; concurrent callers."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

from mmflow.io.cache import cache_root, materialize
from mmflow.storage import Storage, join
from tests.conftest import ROOT
from tests.test_storage import s3_server  # noqa: F401  (the module's moto S3 server)

BUCKET = "s3://mmflow-test"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "model-cache"
    monkeypatch.setenv("MMFLOW_CACHE", str(folder))
    return folder


@pytest.fixture
def remote(s3_server, request):  # noqa: F811
    """A fresh S3 prefix per test, and a writer for ``{name: bytes}`` folders under it."""
    storage = Storage()
    prefix = join(BUCKET, "cache-tests", request.node.name.replace("[", "-").rstrip("]"))
    storage.delete(prefix)

    def put(name: str, files: dict[str, bytes]) -> str:
        uri = join(prefix, name)
        storage.delete(uri)
        for rel, data in files.items():
            storage.write_atomic(join(uri, rel), data)
        return uri

    return put


def tree(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def entries(cache) -> list[str]:
    return sorted(os.listdir(cache))


MODEL = {"config.json": b'{"arch": "tiny"}', "weights/model.bin": b"\x00" * 100}


def test_a_local_uri_is_used_in_place(tmp_path, cache, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    assert materialize(str(model)) == str(model)
    assert materialize(f"file://{model}") == str(model)
    monkeypatch.chdir(tmp_path)
    assert materialize("model") == str(model)  # made absolute
    assert materialize(str(tmp_path / "not-there")) == str(tmp_path / "not-there")
    assert not cache.exists()  # nothing copied, no cache made


def test_cache_root_is_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFLOW_CACHE", str(tmp_path / "mine" / "models"))
    root = cache_root()
    assert root == str(tmp_path / "mine" / "models")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    monkeypatch.delenv("MMFLOW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = cache_root()
    assert default == str(tmp_path / "home" / ".cache" / "mmflow" / "models")
    assert stat.S_IMODE(os.stat(default).st_mode) == 0o700


class CountingStorage(Storage):
    """The real storage, counting the downloads it is asked for."""

    def __init__(self):
        self.downloads = 0

    def download_dir(self, uri, local_dir):
        self.downloads += 1
        super().download_dir(uri, local_dir)

    def read_bytes(self, uri):
        self.downloads += 1
        return super().read_bytes(uri)


def test_a_remote_folder_is_downloaded_once_then_reused(remote, cache):
    uri, storage = remote("clip_model", MODEL), CountingStorage()
    local = materialize(uri, storage)
    assert storage.downloads == 1
    assert os.path.basename(local) == "clip_model"
    assert tree(local) == MODEL
    assert os.path.commonpath([local, str(cache)]) == str(cache)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    (key,) = entries(cache)  # one entry, complete, no temporaries left
    assert sorted(os.listdir(cache / key)) == ["_DONE", "clip_model"]

    assert materialize(uri, storage) == local
    assert materialize(uri + "/", storage) == local  # a trailing slash is the same folder
    assert storage.downloads == 1 and entries(cache) == [key]


def test_a_replaced_folder_is_fetched_again(remote, cache):
    uri = remote("vqgan", MODEL)
    old = materialize(uri)
    new_files = {
        "config.json": b'{"arch": "tiny", "codebook": 64}',
        "weights/model.bin": b"\x01" * 300,
    }
    assert remote("vqgan", new_files) == uri  # a forced re-execution writes the same URI
    new = materialize(uri)
    assert new != old and tree(new) == new_files
    assert tree(old) == MODEL  # the old copy is left alone (a reader may still use it)
    assert len(entries(cache)) == 2


def test_the_same_content_at_two_uris_gets_two_copies(remote, cache):
    a, b = remote("a", MODEL), remote("b", MODEL)
    assert materialize(a) != materialize(b)
    assert tree(materialize(a)) == tree(materialize(b)) == MODEL


def test_a_remote_file_is_downloaded_as_a_file(remote, cache):
    folder = remote("ckpt", {"epoch_3.pt": b"weights" * 10, "epoch_30.pt": b"other"})
    storage = CountingStorage()
    local = materialize(join(folder, "epoch_3.pt"), storage)
    assert os.path.basename(local) == "epoch_3.pt" and os.path.isfile(local)
    with open(local, "rb") as f:
        assert f.read() == b"weights" * 10
    assert materialize(join(folder, "epoch_3.pt"), storage) == local
    assert storage.downloads == 1


def test_missing_remote_models_are_named(remote, cache):
    folder = remote("present", MODEL)
    with pytest.raises(FileNotFoundError, match="no such model folder or file"):
        materialize(join(folder, "absent.pt"))
    with pytest.raises(FileNotFoundError, match="absent-folder"):
        materialize(join(BUCKET, "cache-tests", "absent-folder"))
    assert not cache.exists()  # nothing is set up for what is not there


def state_bytes(seed: int) -> bytes:
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save(nn.Linear(8, 4).state_dict(), buf)
    return buf.getvalue()


def test_a_retrained_model_of_the_same_size_is_fetched_again(remote, cache):
    first, second = state_bytes(0), state_bytes(1)
    assert len(first) == len(second) and first != second  # torch.save of one architecture
    uri = remote("model", {"model.pt": first})
    materialize(uri)
    time.sleep(1.1)  # S3's LastModified has whole seconds: the limit of what the key can tell
    remote("model", {"model.pt": second})  # the stage re-executed with other seeds
    with open(os.path.join(materialize(uri), "model.pt"), "rb") as f:
        assert f.read() == second


def test_a_process_that_loses_the_race_uses_the_winners_copy(remote, cache):
    """Another process finishes its copy while this one downloads: this one's rename fails,
    its own copy is dropped and the winner's returned; nothing is left half-done."""
    uri = remote("raced", MODEL)
    code = "import sys\nfrom mmflow.io.cache import materialize\nprint(materialize(sys.argv[1]))"

    class RacedStorage(Storage):
        def download_dir(self, src, local_dir):
            super().download_dir(src, local_dir)
            winner = subprocess.run(
                [sys.executable, "-c", code, src],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONPATH": ROOT},
                check=True,
            )
            self.winner = winner.stdout.strip()

    storage = RacedStorage()
    local = materialize(uri, storage)
    assert local == storage.winner and tree(local) == MODEL
    (key,) = entries(cache)  # the loser's temporary folder is gone
    assert sorted(os.listdir(cache / key)) == ["_DONE", "raced"]


def test_concurrent_threads_end_with_one_consistent_copy(remote, cache):
    """Two threads of one process (two models loading in a threaded actor, a thread pool)
    materialize the same folder at once. The storage below only orders them, each download is
    the real one: thread a has downloaded but not yet published its copy when thread b
    starts; b downloads once a is finished."""
    uri = remote("threaded", MODEL)
    a_downloaded, b_downloading, a_finished = (threading.Event() for _ in range(3))

    class OrderedStorage(Storage):
        def download_dir(self, src, local_dir):
            if threading.current_thread().name == "b":
                b_downloading.set()  # b has prepared its temporary folder
                a_finished.wait(10)
                super().download_dir(src, local_dir)
                return
            super().download_dir(src, local_dir)
            a_downloaded.set()
            b_downloading.wait(10)

    results, errors = {}, []

    def call():
        try:
            results[threading.current_thread().name] = materialize(uri, OrderedStorage())
        except Exception as e:  # reported below
            errors.append(f"{threading.current_thread().name}: {e!r}")
        finally:
            if threading.current_thread().name == "a":
                a_finished.set()

    a = threading.Thread(target=call, name="a")
    a.start()
    assert a_downloaded.wait(30)
    b = threading.Thread(target=call, name="b")
    b.start()
    a.join(30)
    b.join(30)
    assert errors == []
    assert len(set(results.values())) == 1
    (local,) = set(results.values())
    assert tree(local) == MODEL
    assert [e for e in entries(cache) if e.endswith(".tmp")] == []


def test_sequential_threads_share_one_copy(remote, cache):
    """Calls from several threads that do not overlap: one download, one path for all."""
    uri = remote("pooled", MODEL)
    results = []
    for _ in range(3):
        t = threading.Thread(target=lambda: results.append(materialize(uri)))
        t.start()
        t.join(30)
    assert len(results) == 3 and len(set(results)) == 1
    assert tree(results[0]) == MODEL and len(entries(cache)) == 1
