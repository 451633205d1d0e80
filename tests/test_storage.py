"""Storage over local folders and S3 (a real S3-compatible server on loopback)."""

from __future__ import annotations

import json
import os
import time

import pytest

from mmflow.storage import Storage, join
from tests.conftest import ROOT, run_cli
from tests.servers import moto_s3


def test_local_atomic_write_hides_partial_files(tmp_path):
    st, target = Storage(), str(tmp_path / "a" / "file.bin")
    with pytest.raises(RuntimeError), st.open_atomic(target) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert not st.exists(target) and os.listdir(tmp_path / "a") == []
    st.write_atomic(target, b"whole")
    assert st.read_bytes(target) == b"whole"
    assert [f.name for f in st.ls(str(tmp_path / "a"))] == ["file.bin"]


def test_a_killed_writers_temporary_is_never_listed_as_data(tmp_path):
    """A writer killed mid-write (SIGKILL: no cleanup) leaves its temporary; listings, and so
    every reader that picks files by suffix (shards, stats, Parquet), pass over it until
    ``remove_temporaries`` (the runner, before a stage resumes) deletes it."""
    st, folder = Storage(), str(tmp_path / "shards")
    st.write_json(os.path.join(folder, "00000_stats.json"), {"n": 1})
    os.makedirs(os.path.join(folder, "sub"))
    for name in ("._tmp-abc-00001_stats.json", "._tmp-abc-00001.tar", "sub/._tmp-d-x.parquet"):
        (tmp_path / "shards" / name).write_bytes(b"")
    assert [f.name for f in st.ls(folder)] == ["00000_stats.json", "sub"]
    assert [f.name for f in st.ls(folder, recursive=True)] == ["00000_stats.json", "sub"]
    assert len(st.ls(folder, recursive=True, temporaries=True)) == 5
    assert st.remove_temporaries(folder) == 3
    assert len(st.ls(folder, recursive=True, temporaries=True)) == 2


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (tests/servers.py) with the bucket ``mmflow-test``; the
    environment that points clients at it is set in ``os.environ`` for the module."""
    with moto_s3(("mmflow-test",)) as env:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield env
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_s3_storage_operations(s3_server, tmp_path):
    st, root = Storage(), "s3://mmflow-test/ops"
    st.write_json(join(root, "x", "a.json"), {"a": 1})
    with pytest.raises(RuntimeError), st.open_atomic(join(root, "x", "b.bin")) as f:
        f.write(b"partial")
        raise RuntimeError("killed")
    assert not st.exists(join(root, "x", "b.bin"))  # an aborted upload leaves no object
    assert st.read_json(join(root, "x", "a.json")) == {"a": 1}
    assert st.read_json_if_exists(join(root, "nope.json")) is None
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f.txt").write_text("hello")
    st.upload_dir(str(tmp_path / "d"), join(root, "up"))
    assert [f.name for f in st.ls(join(root, "up"), recursive=True) if not f.is_dir] == ["e/f.txt"]
    st.download_dir(join(root, "up"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "e" / "f.txt").read_text() == "hello"
    st.delete(join(root, "up"))
    assert not st.exists(join(root, "up", "e", "f.txt"))


def test_pipeline_on_s3(s3_server, tmp_path):
    """The runner, Ray tasks and the manifest all work against s3:// storage."""
    path = tmp_path / "p.yaml"
    path.write_text("""
name: s3demo
stages:
  synth:
    type: synth_shapes
    params: {num_samples: 64, samples_per_shard: 32, image_size: 16}
  numbers:
    type: tests.toy_stages:ToyNumbers
    params: {n: 2}
  total:
    type: tests.toy_stages:ToySum
    inputs: {numbers: numbers}
""")
    args = [
        str(path),
        "--storage",
        "s3://mmflow-test/store",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
    ]
    env = {**s3_server, "PYTHONPATH": ROOT}
    r = run_cli("run", *args, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    status = json.loads(run_cli("status", *args, "--json", cwd=str(tmp_path), env=env).stdout)
    assert [s["state"] for s in status["stages"]] == ["done", "done", "done"]
    st = Storage()
    synth = status["stages"][0]["output"]
    assert synth.startswith("s3://mmflow-test/store/s3demo/synth/")
    names = [f.name for f in st.ls(join(synth, "shards"))]
    assert names == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
    ]
    total = st.read_json(join(status["stages"][2]["output"], "total", "total.json"))
    assert total["total"] == 1
    r2 = run_cli("run", *args, cwd=str(tmp_path), env=env)
    assert "0 executed, 3 cached" in r2.stdout


def test_s3_failed_write_never_publishes(s3_server):
    """A write that raises leaves no object, even after pyarrow's stream is collected (it would
    complete the multipart upload on destruction), and replaces no older object."""
    import gc

    st, uri = Storage(), "s3://mmflow-test/partial/shard.tar"

    def fail_mid_write():
        with st.open_atomic(uri) as f:
            f.write(b"x" * 7000)
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        fail_mid_write()
    gc.collect()
    time.sleep(0.2)
    assert not st.exists(uri)
    assert [f.name for f in st.ls("s3://mmflow-test/partial", recursive=True)] == []
    st.write_atomic(uri, b"old")
    with pytest.raises(RuntimeError):
        fail_mid_write()
    gc.collect()
    assert st.read_bytes(uri) == b"old"
    assert [f.name for f in st.ls("s3://mmflow-test/partial", recursive=True)] == ["shard.tar"]


def test_download_dir_refuses_names_outside_the_target(s3_server, tmp_path):
    """A remote key with ``..`` segments may not write outside the local folder."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    client.put_object(Bucket="mmflow-test", Key="dl/ok.txt", Body=b"ok")
    # Both the literal key and the one its dot segments resolve to exist: a client that
    # normalizes the path reads the second and writes it beside the target folder.
    client.put_object(Bucket="mmflow-test", Key="dl/sub/../../x/escape.txt", Body=b"bad")
    client.put_object(Bucket="mmflow-test", Key="x/escape.txt", Body=b"bad")
    st = Storage()
    target = tmp_path / "deep" / "target"
    with pytest.raises(ValueError, match="outside"):
        st.download_dir("s3://mmflow-test/dl", str(target))
    assert not any(p.name == "escape.txt" for p in tmp_path.rglob("*"))
    client.delete_object(Bucket="mmflow-test", Key="dl/sub/../../x/escape.txt")
    st.download_dir("s3://mmflow-test/dl", str(target))
    assert [p.name for p in target.rglob("*")] == ["ok.txt"]
