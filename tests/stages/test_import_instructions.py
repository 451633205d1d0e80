"""import_instructions: a hostile LLaVA JSONL (and a Pretrain-style .json) file into shards and
an instruction table; every bad entry counted by kind and listed, images stored once and
readable by key, and the same from s3://."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmflow.data.instructions import INSTRUCTION_SCHEMA
from mmflow.data.webdataset_io import iter_shard
from mmflow.stages.import_instructions import (
    REJECTED_KINDS,
    ImportInstructionsParams,
    ImportJob,
    import_shard,
    plan_import,
)
from mmflow.storage import Storage, join
from tests.conftest import run_pipeline
from tests.test_storage import s3_server  # noqa: F401  (the module's moto S3 server)


def picture(w: int, h: int, fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


QA = turns(("human", "<image>\nWhat is it?"), ("gpt", "noise"))
TWO_QA = QA + turns(("human", "And the colour?"), ("gpt", "every colour"))


def line(entry) -> bytes:
    return json.dumps(entry).encode()


# One line per case; the comment is what the stage must make of it.
LINES = [
    line({"id": "cap-a", "image": "a.jpg", "conversations": turns(("human", "<image>\nDescribe briefly."), ("gpt", "a noisy picture"))}),  # caption
    line({"id": "conv-b", "image": "sub/b.png", "conversations": TWO_QA}),  # conversation
    line({"id": "conv-a", "image": "./a.jpg", "conversations": TWO_QA}),  # same picture as cap-a
    line({"id": "missing", "image": "nope.jpg", "conversations": QA}),  # missing_image
    line({"id": "no-token", "image": "a.jpg", "conversations": turns(("human", "What?"), ("gpt", "x"))}),
    line({"id": "order", "image": "a.jpg", "conversations": QA[::-1]}),  # wrong_turn_order
    line({"id": "empty", "image": "a.jpg", "conversations": turns(("human", "<image>\nq"), ("gpt", " "))}),
    b'{"id": "latin", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nCaf\xe9?"}]}',
    line({"id": "broken", "image": "broken.jpg", "conversations": QA}),  # unreadable_image
    b'{"id": "cut", "image": ',  # bad_json
    line({"id": "text-only", "conversations": QA}),  # no_image
    line({"id": "tokens", "image": "a.jpg", "conversations": QA + turns(("human", "<image>"), ("gpt", "x"))}),
    line({"id": "pretrain", "image": "c.jpg", "conversations": turns(("human", "Caption this.\n<image>"), ("gpt", "c caption"))}),
    line({"id": "conv-b", "image": "sub/b.png", "conversations": QA}),  # an id seen before
    line({"id": "escape", "image": "../outside.jpg", "conversations": QA}),  # unsafe_image_path
    line({"id": "half", "image": "half.jpg", "conversations": QA}),  # a JPEG cut short
    b"[1, 2]",  # malformed
    b"",
]  # fmt: skip
REJECTED = [
    (3, "missing", "missing_image"), (4, "no-token", "no_image_token"),
    (5, "order", "wrong_turn_order"), (6, "empty", "empty_answer"), (7, None, "bad_encoding"),
    (8, "broken", "unreadable_image"), (9, None, "bad_json"), (10, "text-only", "no_image"),
    (11, "tokens", "extra_image_token"), (14, "escape", "unsafe_image_path"),
    (15, "half", "unreadable_image"), (16, None, "malformed"),
]  # fmt: skip
PRETRAIN = [  # a LLaVA-Pretrain-style .json, imported with kind: caption
    {"id": "p0", "image": "a.jpg", "conversations": turns(("human", "<image>\nShort caption."), ("gpt", "noise"))},
    {"id": "p1", "image": "c.jpg", "conversations": TWO_QA},  # multi_turn_caption
    {"id": "p2", "image": "c.jpg", "conversations": turns(("human", "<image>"), ("gpt", "BAD"))},
    {"id": "p3", "image": "sub/b.png", "conversations": turns(("human", "Summary.\n<image>"), ("gpt", "b"))},
]  # fmt: skip


def write_inputs(folder) -> dict[str, bytes]:
    """The image folder (good, missing, broken, truncated pictures) and the two files."""
    jpg = picture(20, 12, "JPEG", 1)
    images = {
        "a.jpg": jpg,
        "sub/b.png": picture(9, 14, "PNG", 2),
        "c.jpg": picture(16, 16, "JPEG", 3),
        "broken.jpg": b"not a picture at all",
        "half.jpg": jpg[: len(jpg) // 2],
    }
    for name, data in images.items():
        os.makedirs(os.path.dirname(folder / "imgs" / name), exist_ok=True)
        (folder / "imgs" / name).write_bytes(data)
    (folder / "outside.jpg").write_bytes(jpg)  # must never be read
    (folder / "llava.jsonl").write_bytes(b"\n".join(LINES))
    raw = json.dumps(PRETRAIN).encode().replace(b'"BAD"', b'"caf\xe9"')
    (folder / "pretrain.json").write_bytes(raw)
    return images


@pytest.fixture(scope="module")
def done(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("import_inst")
    images = write_inputs(folder)
    stages = f"""
    inst:
      type: import_instructions
      params: {{file: {folder}/llava.jsonl, image_folder: {folder}/imgs, samples_per_shard: 2}}
    pre:
      type: import_instructions
      params: {{file: {folder}/pretrain.json, image_folder: {folder}/imgs, kind: caption}}
    """
    runner, _ = run_pipeline(folder, stages, name="ii")
    return runner, images


def rows_of(man) -> list[dict]:
    return pq.read_table(man["outputs"]["instructions"]["uri"]).to_pylist()


def test_every_bad_entry_is_counted_by_kind_and_listed(done):
    runner, _ = done
    man = runner.manifest("inst")
    m = man["metrics"]
    expected = {k: sum(kind == k for _, _, kind in REJECTED) for k in REJECTED_KINDS}
    assert {k: m[f"rejected_{k}"] for k in REJECTED_KINDS} == expected
    assert m["rejected_total"] == 12 and m["imported"] == 5 and m["entries"] == 17
    assert m["images"] == 3 and m["caption_rows"] == 3 and m["conversation_rows"] == 2
    folder = man["outputs"]["instructions"]["uri"]
    listed = [json.loads(x) for x in open(os.path.join(folder, "_rejected.jsonl"))]
    assert [(r["index"], r["id"], r["kind"]) for r in listed] == REJECTED
    assert all(r["detail"] for r in listed)
    assert "nope.jpg" in listed[0]["detail"] and "['gpt', 'human']" in listed[2]["detail"]
    assert man["outputs"]["instructions"]["rejected"] == {k: n for k, n in expected.items() if n}


def test_good_rows_name_their_picture_by_key_and_shard(done):
    runner, images = done
    man = runner.manifest("inst")
    shards = man["outputs"]["shards"]["uri"]
    tables = man["outputs"]["instructions"]["uri"]
    assert sorted(f for f in os.listdir(tables) if f.endswith(".parquet")) == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
    ]  # fmt: skip  (one per shard; 00001 holds only failures, so no rows)
    for f in ("00000.parquet", "00001.parquet", "00002.parquet"):
        table = pq.read_table(os.path.join(tables, f))
        assert table.schema.equals(INSTRUCTION_SCHEMA, check_metadata=True)
    rows = {r["id"]: r for r in rows_of(man)}
    assert sorted(rows) == ["cap-a", "conv-a", "conv-b", "conv-b#13", "pretrain"]
    assert {i: rows[i]["kind"] for i in rows} == {
        "cap-a": "caption", "conv-a": "conversation", "conv-b": "conversation",
        "conv-b#13": "caption", "pretrain": "caption",
    }  # fmt: skip
    assert json.loads(rows["conv-b"]["conversations"]) == TWO_QA
    assert json.loads(rows["pretrain"]["conversations"]) == turns(
        ("human", "<image>\nCaption this."), ("gpt", "c caption")
    )  # the image token moved to the front, as LLaVA's preprocessing does
    assert all(r["qtypes"] == [] and r["scene"] == "" for r in rows.values())
    # one stored picture per image, shared by the entries that use it
    assert rows["cap-a"]["key"] == rows["conv-a"]["key"] and rows["cap-a"]["shard"] == rows["conv-a"]["shard"]  # fmt: skip
    assert rows["conv-b"]["key"] == rows["conv-b#13"]["key"]
    stored = {}
    for tar in sorted(f for f in os.listdir(shards) if f.endswith(".tar")):
        for s in iter_shard(Storage(), os.path.join(shards, tar)):
            assert s.error is None
            stored[s.meta["source_image"]] = (os.path.join(shards, tar), s)
    assert sorted(stored) == ["a.jpg", "c.jpg", "sub/b.png"]
    for rid, name in (("cap-a", "a.jpg"), ("conv-b", "sub/b.png"), ("pretrain", "c.jpg")):
        tar, s = stored[name]
        assert (rows[rid]["shard"], rows[rid]["key"]) == (tar, s.key)
        assert s.image == images[name]  # original bytes kept (RGB JPEG and PNG)
        assert Image.open(io.BytesIO(s.image)).size == Image.open(io.BytesIO(images[name])).size
    assert stored["a.jpg"][1].caption == "a noisy picture" and stored["c.jpg"][1].image_ext == "jpg"
    failed = pq.read_table(os.path.join(shards, "00001.parquet")).to_pylist()
    assert [r["status"] for r in failed] == ["failed_to_import"] * 2
    assert man["outputs"]["shards"]["num_samples"] == 3


def test_caption_files_reject_conversations(done):
    runner, _ = done
    man = runner.manifest("pre")
    m = man["metrics"]
    assert m["imported"] == 2 and m["caption_rows"] == 2 and m["rejected_total"] == 2
    assert m["rejected_multi_turn_caption"] == 1 and m["rejected_bad_encoding"] == 1
    assert sorted(r["id"] for r in rows_of(man)) == ["p0", "p3"]
    assert all(r["kind"] == "caption" for r in rows_of(man))


def test_params_need_a_file_and_an_image_folder():
    with pytest.raises(ValueError, match="no file"):
        ImportInstructionsParams(image_folder="x")
    with pytest.raises(ValueError, match="no image_folder"):
        ImportInstructionsParams(file="x.jsonl", image_folder=" ")


def test_images_and_file_on_s3_resized(s3_server, tmp_path):  # noqa: F811
    """Planning and the shard task read the file and the pictures through Storage, from S3, and
    write shards and table there; ``image_size`` shrinks the longer side."""
    storage, root = Storage(), "s3://mmflow-test/llava"
    images = write_inputs(tmp_path)
    for name, data in images.items():
        storage.write_atomic(join(root, "imgs", name), data)
    storage.write_atomic(join(root, "llava.jsonl"), (tmp_path / "llava.jsonl").read_bytes())
    p = ImportInstructionsParams(
        file=join(root, "llava.jsonl"), image_folder=join(root, "imgs"), samples_per_shard=8,
        image_size=10,
    )  # fmt: skip
    plan = plan_import(storage.read_bytes(p.file), p.file, p)
    assert len(plan.shards) == 1 and len(plan.rejected) == 9  # the image problems come later
    plans = str(tmp_path / "plans")
    storage.write_json(join(plans, "00000.json"), plan.shards[0])
    job = ImportJob(plans, p.image_folder, join(root, "shards"), join(root, "table"), 10, storage)
    stats = import_shard(0, job)
    assert stats["rows"] == 5 and stats["successes"] == 3
    kinds = sorted(r["kind"] for r in stats["rejected"])
    assert kinds == ["missing_image", "unreadable_image", "unreadable_image"]
    with storage.open_input(join(root, "table", "00000.parquet")) as f:
        rows = pq.read_table(f).to_pylist()
    tar = join(root, "shards", "00000.tar")
    assert {r["shard"] for r in rows} == {tar}
    pictures = {s.key: s for s in iter_shard(storage, tar)}
    assert {r["key"] for r in rows} == set(pictures)
    sizes = sorted(Image.open(io.BytesIO(s.image)).size for s in pictures.values())
    assert sizes == [(6, 10), (10, 6), (10, 10)]
