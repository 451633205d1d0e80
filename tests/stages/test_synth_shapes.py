"""synth_shapes: deterministic, img2dataset layout, ground truth, resumable by shard."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmflow.config import load_pipeline
from mmflow.data.shards import read_index
from mmflow.runner import Runner
from mmflow.stages.synth_shapes import SynthShapesParams, make_sample, write_shard
from mmflow.storage import Storage

PIPE = """
synth:
  type: synth_shapes
  params: {num_samples: 300, samples_per_shard: 128, image_size: 24, mismatch_fraction: 0.25}
"""


def read_tar(path):
    members = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            members[m.name] = tf.extractfile(m).read()
    return members


def test_samples_depend_only_on_seed_and_index():
    p = SynthShapesParams(num_samples=10, image_size=24)
    a, ta = make_sample(0, 7, p)
    b, tb = make_sample(0, 7, p)
    c, _ = make_sample(1, 7, p)
    assert a == b and ta == tb and a != c
    img = Image.open(io.BytesIO(a))
    assert img.size == (24, 24) and img.mode == "RGB"


def test_mismatched_captions_describe_another_scene():
    p = SynthShapesParams(num_samples=400, mismatch_fraction=0.5)
    truths = [make_sample(3, i, p)[1] for i in range(400)]
    mism = [t for t in truths if t["mismatched"]]
    assert 150 < len(mism) < 250
    for t in mism:
        assert t["caption"] != t["true_caption"]
        for o in t["scene"]["objects"]:  # no (colour, shape) of the real scene is named together
            assert f"{o['color']} {o['shape']}" not in t["caption"]
    for t in truths:
        if not t["mismatched"]:
            assert t["caption"] == t["true_caption"]
            o = t["scene"]["objects"][0]
            assert o["color"] in t["caption"] and o["shape"] in t["caption"]


def test_stage_writes_img2dataset_layout(write_pipeline, ray_session):
    r = Runner(load_pipeline(write_pipeline(PIPE)))
    r.run()
    folder = os.path.join(r.uri("synth"), "shards")
    names = sorted(os.listdir(folder))
    assert names == [
        f"0000{i}{ext}" for i in range(3) for ext in (".parquet", ".tar", "_stats.json")
    ]
    keys = []
    for shard in range(3):
        members = read_tar(os.path.join(folder, f"0000{shard}.tar"))
        shard_keys = sorted({n.rsplit(".", 1)[0] for n in members})
        assert all({f"{k}.jpg", f"{k}.txt", f"{k}.json"} <= set(members) for k in shard_keys)
        table = pq.read_table(os.path.join(folder, f"0000{shard}.parquet"))
        for col in (
            "url",
            "caption",
            "key",
            "status",
            "error_message",
            "width",
            "height",
            "original_width",
            "original_height",
            "sha256",
            "mismatched",
            "true_caption",
        ):
            assert col in table.column_names
        assert sorted(table.column("key").to_pylist()) == shard_keys
        meta = json.loads(members[f"{shard_keys[0]}.json"])
        assert meta["key"] == shard_keys[0] and meta["status"] == "success" and "synth" in meta
        assert members[f"{shard_keys[0]}.txt"].decode() == meta["caption"]
        stats = json.load(open(os.path.join(folder, f"0000{shard}_stats.json")))
        assert stats["count"] == stats["successes"] == len(shard_keys)
        keys += shard_keys
    assert len(keys) == len(set(keys)) == 300
    man = json.load(open(os.path.join(r.uri("synth"), "_MANIFEST.json")))
    assert man["outputs"]["shards"]["num_samples"] == 300
    assert 0.15 < man["metrics"]["mismatch_rate"] < 0.35


def test_only_with_override_and_fingerprint_change(write_pipeline, ray_session):
    path = write_pipeline(PIPE)
    r = Runner(load_pipeline(path, ["synth.params.num_samples=256"]))
    assert r.run(only=["synth"]).executed == ["synth"]
    table = read_index(Storage(), os.path.join(r.uri("synth"), "shards"))
    assert table.num_rows == 256 and len(set(table.column("key").to_pylist())) == 256
    other = Runner(load_pipeline(path, ["synth.params.num_samples=257"]))
    assert other.fingerprints["synth"] != r.fingerprints["synth"]


def test_finished_shards_are_not_redone(tmp_path):
    storage, folder = Storage(), str(tmp_path / "shards")
    p = SynthShapesParams(num_samples=20, samples_per_shard=10)
    write_shard(0, folder, p, storage)
    stats0 = os.stat(os.path.join(folder, "00000_stats.json")).st_mtime_ns
    # A half-written file from a killed attempt is hidden and cleaned, never published.
    (tmp_path / "shards" / "._tmp-abc-00001.tar").write_bytes(b"partial")
    assert storage.remove_temporaries(folder) == 1
    from mmflow.data.shards import map_shards

    pytest.importorskip("ray")
    import ray

    if not ray.is_initialized():
        pytest.skip("needs the session Ray")
    map_shards(write_shard, [0, 1], folder, args=(folder, p, storage), storage=storage)
    assert os.stat(os.path.join(folder, "00000_stats.json")).st_mtime_ns == stats0
    assert os.path.exists(os.path.join(folder, "00001_stats.json"))
