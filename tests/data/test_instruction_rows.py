"""Instruction rows joined with their pictures, on real shards (synth_shapes' ``write_shard``) and
the table synth_instructions writes about them: the (table file, shard) pairs, rows chosen by
kind and held-out split, the picture bytes attached, rows whose picture is missing counted,
held-out rows for evaluation, and each training rank's share."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from mmflow.data.holdout import is_held_out
from mmflow.data.instruction_rows import (
    heldout_rows,
    joined_rows,
    selected,
    table_files,
    table_pairs,
)
from mmflow.data.instructions import instruction_row, write_instruction_table
from mmflow.data.shards import list_shards
from mmflow.data.webdataset_io import iter_shard
from mmflow.stages.synth_instructions import SynthInstructionsParams, SynthJob, write_table_shard
from mmflow.stages.synth_shapes import SynthShapesParams, write_shard
from mmflow.storage import Storage, normalize

FRACTION = 0.3  # large, so that 48 pictures hold some out (7 of them, by their hashes)
KINDS = ("caption", "conversation")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """(table folder, {key: image bytes}): 48 pictures in 3 shards, a caption row and two
    conversation rows each."""
    root = tmp_path_factory.mktemp("rows")
    storage = Storage()
    shapes = SynthShapesParams(
        num_samples=48, samples_per_shard=16, image_size=16, image_format="png"
    )
    for shard in range(3):
        write_shard(shard, str(root / "shards"), shapes, storage)
    shards = [normalize(u) for u in list_shards(storage, str(root / "shards"))]
    job = SynthJob(shards, str(root / "table"), str(root / "done"), SynthInstructionsParams(conversations_per_image=2),
                   storage)  # fmt: skip
    for shard in range(3):
        write_table_shard(shard, job)
    images = {s.key: s.image for tar in shards for s in iter_shard(storage, tar)}
    return str(root / "table"), images


def all_rows(folder: str) -> list[dict]:
    return pq.read_table(folder).to_pylist()


def test_one_pair_per_table_file_naming_its_shard(table, tmp_path):
    folder, _ = table
    (open(os.path.join(folder, "_rejected.jsonl"), "w")).close()  # not a table file
    os.makedirs(os.path.join(folder, "sub.parquet"), exist_ok=True)  # a folder, not a file
    files = table_files(Storage(), folder)
    assert [os.path.basename(f) for f in files] == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
    ]
    pairs = table_pairs(Storage(), folder)
    assert [p["table"] for p in pairs] == files
    assert [os.path.basename(p["shard"]) for p in pairs] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(os.path.isfile(p["shard"]) for p in pairs)

    with pytest.raises(ValueError, match=f"no Parquet files in {tmp_path}"):
        table_files(Storage(), str(tmp_path))
    rows = all_rows(files[0])[:2]
    mixed = [rows[0], {**rows[1], "shard": "/elsewhere/00009.tar"}]
    write_instruction_table(Storage(), str(tmp_path / "mixed" / "00000.parquet"), mixed)
    with pytest.raises(ValueError, match="rows name 2 shards; an instruction file names one"):
        table_pairs(Storage(), str(tmp_path / "mixed"))
    write_instruction_table(Storage(), str(tmp_path / "empty" / "00000.parquet"), [])
    assert table_pairs(Storage(), str(tmp_path / "empty")) == []  # a shard with no usable picture


def test_selected_follows_kind_and_the_shared_split():
    keys = [f"{i:09d}" for i in range(400)]
    held = [k for k in keys if selected(k, "caption", KINDS, "heldout", 0.1)]
    train = [k for k in keys if selected(k, "caption", KINDS, "train", 0.1)]
    assert sorted(held + train) == keys and not set(held) & set(train)
    assert held == [k for k in keys if is_held_out(k, 0.1)] and 20 < len(held) < 60
    assert not any(
        selected(k, "caption", ("conversation",), split, 0.1)
        for k in keys
        for split in ("train", "heldout")
    )
    assert all(selected(k, "caption", KINDS, "train", 0.0) for k in keys)  # nothing held out


def test_joined_rows_carry_their_picture_in_table_order(table):
    folder, images = table
    pairs = table_pairs(Storage(), folder)
    for pair in pairs:
        want = [r for r in all_rows(pair["table"]) if not is_held_out(r["key"], FRACTION)]
        got = list(joined_rows(pair, kinds=KINDS, split="train", holdout_fraction=FRACTION))
        assert [r["id"] for r in got] == [r["id"] for r in want] and got
        for r in got:
            assert r["image"] == images[r["key"]]  # the picture the row names, byte for byte
            assert set(r) == {"id", "key", "kind", "conversations", "qtypes", "scene", "image"}
            assert json.loads(r["conversations"])[0]["value"].startswith("<image>\n")

    def ids(kinds, split):
        return [r["id"] for p in pairs for r in joined_rows(p, kinds=kinds, split=split, holdout_fraction=FRACTION,
                                                            images=False)]  # fmt: skip

    every = [r["id"] for r in all_rows(folder)]
    train, held = ids(KINDS, "train"), ids(KINDS, "heldout")
    assert sorted(train + held) == sorted(every) and not set(train) & set(held) and held
    captions = ids(("caption",), "train")
    assert captions and all(i.endswith("-caption") for i in captions)
    assert sorted(captions + ids(("conversation",), "train")) == sorted(train)


def test_without_images_the_shard_is_not_read(table, tmp_path):
    folder, _ = table
    pair = table_pairs(Storage(), folder)[0]
    gone = {**pair, "shard": str(tmp_path / "no-such.tar")}
    rows = list(
        joined_rows(gone, kinds=KINDS, split="train", holdout_fraction=FRACTION, images=False)
    )
    assert rows and all("image" not in r for r in rows)
    with pytest.raises(FileNotFoundError):
        list(joined_rows(gone, kinds=KINDS, split="train", holdout_fraction=FRACTION))


def test_a_row_whose_picture_is_not_in_the_shard_is_reported_missing(table, tmp_path):
    folder, _ = table
    pair = table_pairs(Storage(), folder)[0]
    rows = [r for r in all_rows(pair["table"]) if r["kind"] == "caption"][:3]
    stray = instruction_row(id="stray", key="000009999", shard=pair["shard"], kind="caption",
                            conversations=json.loads(rows[0]["conversations"]))  # fmt: skip
    write_instruction_table(
        Storage(), str(tmp_path / "t" / "00000.parquet"), [rows[0], stray, *rows[1:]]
    )
    missing: list[str] = []
    got = list(joined_rows({**pair, "table": str(tmp_path / "t" / "00000.parquet")}, kinds=KINDS, split="train",
                           holdout_fraction=0.0, missing=missing))  # fmt: skip
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    assert missing == ["000009999"]
    # without a list to report to, the row is still skipped
    assert len(list(joined_rows({**pair, "table": str(tmp_path / "t" / "00000.parquet")}, kinds=KINDS,
                                split="train", holdout_fraction=0.0))) == 3  # fmt: skip


def test_heldout_rows_one_per_picture_up_to_the_limit(table):
    folder, images = table
    pairs = table_pairs(Storage(), folder)
    held_keys = [k for k in sorted(images) if is_held_out(k, FRACTION)]
    assert len(held_keys) == 7

    rows = heldout_rows(pairs, kinds=KINDS, holdout_fraction=FRACTION, limit=1000)
    assert [r["key"] for r in rows] == held_keys  # table order: shard by shard, key by key
    # a picture's first row is its caption row
    assert all(r["kind"] == "caption" and r["image"] == images[r["key"]] for r in rows)

    first = heldout_rows(pairs, kinds=KINDS, holdout_fraction=FRACTION, limit=4)
    assert [r["id"] for r in first] == [r["id"] for r in rows[:4]]

    every = heldout_rows(pairs, kinds=("conversation",), holdout_fraction=FRACTION, limit=1000, images=False,
                         one_per_picture=False)  # fmt: skip
    assert len(every) == 2 * len(held_keys) and all("image" not in r for r in every)
    assert heldout_rows(pairs, kinds=KINDS, holdout_fraction=0.0, limit=10) == []


@pytest.mark.parametrize("world", [2, 3, 5])
def test_training_ranks_share_the_rows_without_overlap(table, world):
    """:meth:`mmflow.tasks.llava._ChatTask.rows`: whole pairs per rank (world <= pairs), or
    every world-th row of every pair (world > pairs)."""
    from mmflow.tasks.llava import LmTask
    from mmflow.train.config import TrainConfig

    folder, _ = table
    pairs = table_pairs(Storage(), folder)
    data = {"pairs": pairs, "kinds": KINDS, "holdout_fraction": FRACTION, "images": False}
    task = LmTask(lm_config={}, val_texts=[], data=data, train=TrainConfig(), tokenizer_json="", max_len=64,
                  shuffle_buffer=1, threads=1, save_meta={})  # fmt: skip
    shares = [[r["id"] for r in task.rows(rank, world)] for rank in range(world)]
    flat = [i for s in shares for i in s]
    train = [r["id"] for p in pairs for r in joined_rows(p, kinds=KINDS, split="train", holdout_fraction=FRACTION,
                                                         images=False)]  # fmt: skip
    assert sorted(flat) == sorted(train) and len(set(flat)) == len(flat)
    assert all(shares)
    if world <= len(pairs):  # a rank reads whole table files
        by_file = {
            r["id"]: os.path.basename(p["table"]) for p in pairs for r in all_rows(p["table"])
        }
        files = [{by_file[i] for i in s} for s in shares]
        assert all(not a & b for j, a in enumerate(files) for b in files[j + 1 :])
