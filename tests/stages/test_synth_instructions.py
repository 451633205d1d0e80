"""synth_instructions: one table file per shard with true captions and QA turns about each scene,
the exact schema, rows that point at readable images, and bad samples counted, not fatal."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest

from mmflow.data.instructions import INSTRUCTION_SCHEMA, QUESTION_TYPES, check_entry
from mmflow.data.shapes_vocab import mentioned, scene_prompt
from mmflow.data.webdataset_io import iter_shard
from mmflow.stages.synth_instructions import SynthInstructionsParams, SynthJob, write_table_shard
from mmflow.stages.synth_shapes import SynthShapesParams, make_sample
from mmflow.storage import Storage
from tests.conftest import run_pipeline

PIPELINE = """
synth:
  type: synth_shapes
  params: {num_samples: 40, samples_per_shard: 16, image_size: 16, mismatch_fraction: 0.5}
inst:
  type: synth_instructions
  inputs: {shards: synth}
  params: {conversations_per_image: 2, turns_min: 1, turns_max: 3, seed: 3}
"""


@pytest.fixture(scope="module")
def done(ray_session, tmp_path_factory):
    runner, _ = run_pipeline(tmp_path_factory.mktemp("synth_inst"), PIPELINE, name="si")
    return runner


def test_one_table_file_per_shard_with_the_exact_schema(done):
    man = done.manifest("inst")
    folder = man["outputs"]["instructions"]["uri"]
    assert sorted(os.listdir(folder)) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    shards = os.path.join(done.manifest("synth")["outputs"]["shards"]["uri"])
    for name in os.listdir(folder):
        table = pq.read_table(os.path.join(folder, name))
        assert table.schema.equals(INSTRUCTION_SCHEMA, check_metadata=True)
        assert set(table["shard"].to_pylist()) == {os.path.join(shards, name[:5] + ".tar")}
    info = man["outputs"]["instructions"]
    assert info["num_rows"] == 40 * 3 and info["num_files"] == 3
    assert info["format"] == "mmflow-instructions"


def test_rows_tell_the_truth_about_the_image_they_name(done):
    folder = done.manifest("inst")["outputs"]["instructions"]["uri"]
    rows = pq.read_table(folder).to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == 120
    mismatched_seen = 0
    storage = Storage()
    for shard in sorted({r["shard"] for r in rows}):
        samples = {s.key: s for s in iter_shard(storage, shard)}
        mine = [r for r in rows if r["shard"] == shard]
        assert {r["key"] for r in mine} == set(samples)
        for r in mine:
            sample = samples[r["key"]]
            scene = json.loads(r["scene"])
            assert scene == sample.meta["synth"] and sample.image
            turns = json.loads(r["conversations"])
            assert check_entry({"image": r["key"], "conversations": turns}) is None
            if r["kind"] == "caption":
                assert r["qtypes"] == ["caption"] and len(turns) == 2
                named = mentioned(turns[1]["value"])  # the scene's own caption, never a mismatch
                assert set(named["colors"]) == {o["color"] for o in scene["objects"]}
                mismatched_seen += sample.meta["mismatched"]
            else:
                assert r["kind"] == "conversation" and 1 <= len(r["qtypes"]) <= 3
                assert len(turns) == 2 * len(r["qtypes"])
                for i, qtype in enumerate(r["qtypes"]):
                    if qtype == "describe":
                        assert turns[2 * i + 1]["value"] == scene_prompt(scene)
                    if qtype == "count":
                        assert turns[2 * i + 1]["value"] == ["one", "two"][len(scene["objects"]) - 1]  # fmt: skip
    assert mismatched_seen > 5  # the shard caption lied there; the row did not


def test_metrics_count_rows_and_question_types(done):
    m = done.manifest("inst")["metrics"]
    assert m["rows"] == 120 and m["caption_rows"] == 40 and m["conversation_rows"] == 80
    assert m["images"] == 40 and m["skipped_total"] == 0
    qtypes = [m[f"qtype_{q}"] for q in QUESTION_TYPES]
    assert all(n > 0 for n in qtypes) and 80 <= sum(qtypes) <= 240


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_samples_without_ground_truth_or_unreadable_are_counted_and_skipped(tmp_path):
    p = SynthShapesParams(num_samples=2, image_size=16)
    (img0, t0), (img1, t1) = make_sample(0, 0, p), make_sample(0, 1, p)
    meta = lambda t: json.dumps({"caption": t["caption"], "synth": t["scene"]}).encode()  # noqa: E731
    tar = str(tmp_path / "in" / "00000.tar")
    os.makedirs(os.path.dirname(tar))
    write_tar(tar, [
        ("000000000.jpg", img0), ("000000000.json", meta(t0)),
        ("000000001.jpg", img1), ("000000001.json", b'{"caption": "web data"}'),
        ("000000002.txt", b"no picture"), ("000000002.json", meta(t0)),
        ("000000003.jpg", img1), ("000000003.json", b"{broken"),
        ("000000004.jpg", img1), ("000000004.json", meta(t1)),
    ])  # fmt: skip
    params = SynthInstructionsParams(conversations_per_image=1)
    out, done = str(tmp_path / "out"), str(tmp_path / "work")
    stats = write_table_shard(0, SynthJob([tar], out, done, params, Storage()))
    assert stats["images"] == 2 and stats["rows"] == 4
    assert stats["skipped_no_ground_truth"] == 1
    assert stats["skipped_missing_image"] == 1 and stats["skipped_corrupt_json"] == 1
    rows = pq.read_table(os.path.join(out, "00000.parquet")).to_pylist()
    assert [r["id"] for r in rows] == [
        "000000000-caption", "000000000-conv0", "000000004-caption", "000000004-conv0",
    ]  # fmt: skip
    assert os.path.exists(os.path.join(done, "00000_stats.json"))  # the shard is done
    again = write_table_shard(0, SynthJob([tar], out, done, params, Storage()))
    assert again == stats and pq.read_table(os.path.join(out, "00000.parquet")).to_pylist() == rows


def test_params_are_checked_at_load():
    with pytest.raises(ValueError, match="turns_min"):
        SynthInstructionsParams(turns_min=4, turns_max=2)
    with pytest.raises(ValueError, match="no rows"):
        SynthInstructionsParams(captions=False, conversations_per_image=0)
    with pytest.raises(ValueError):
        SynthInstructionsParams(turns_max=9)
