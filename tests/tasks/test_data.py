"""tasks.data: per-rank assignment, the training stream (disjoint ranks, no held-out keys, skips
counted by reason over the first pass only) and the held-out set (first N in shard order)."""

from __future__ import annotations

import io
import random
import tarfile
from collections import Counter

import pytest
from PIL import Image

from mmflow.data.holdout import is_held_out
from mmflow.data.shards import list_shards
from mmflow.stages.synth_shapes import SynthShapesParams, write_shard
from mmflow.storage import Storage
from mmflow.tasks.data import (
    ShardData,
    SkipCounter,
    assign,
    error_kind,
    load_heldout,
    train_stream,
)

KEY = lambda s, image: s.key  # noqa: E731  (prepare: the sample's key, image decoded)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    p = SynthShapesParams(num_samples=120, samples_per_shard=30, image_size=16)
    for s in range(4):
        write_shard(s, folder, p, Storage())
    return list_shards(Storage(), folder)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def defective_shard(path) -> str:
    """Two good pairs and one of each defect, in this order."""
    return write_tar(
        path,
        [
            ("a.png", png()), ("a.txt", b"a red square"),
            ("b.png", b"not an image at all"), ("b.txt", b"undecodable"),
            ("c.png", png()), ("c.txt", b"  "),
            ("d.txt", b"no image"),
            ("e.png", png()), ("e.txt", b"bad json"), ("e.json", b"{nope"),
            ("f.png", png()), ("f.txt", b"another red square"),
        ],
    )  # fmt: skip


def test_assign_gives_whole_shards_or_every_world_th_sample():
    five = [f"s{i}" for i in range(5)]
    assert [assign(five, r, 2).shards for r in (0, 1)] == [["s0", "s2", "s4"], ["s1", "s3"]]
    assert all(assign(five, 1, 2).takes(i) for i in range(7))
    few = [assign(["s0"], r, 3) for r in range(3)]
    assert all(a.shards == ["s0"] and not a.by_shard for a in few)
    assert [[i for i in range(7) if a.takes(i)] for a in few] == [[0, 3, 6], [1, 4], [2, 5]]


@pytest.mark.parametrize("world", [2, 8])  # 4 shards: whole shards, then every 8th sample
def test_ranks_read_disjoint_samples_and_never_the_holdout(shards, world):
    def keys(rank, world):
        counter = SkipCounter()
        stream = train_stream(
            shards, rank, world, random.Random(0), holdout_fraction=0.2, prepare=KEY,
            counter=counter,
        )  # fmt: skip
        return Counter(stream), counter

    single, counted = keys(0, 1)
    assert not any(is_held_out(k, 0.2) for k in single) and 80 < single.total() < 110
    assert counted.counts() == {"samples_seen": single.total()}
    per_rank = [keys(r, world) for r in range(world)]
    assert sum((c for c, _ in per_rank), Counter()) == single
    assert all(c.total() > 0 for c, _ in per_rank)
    assert sum(n.seen for _, n in per_rank) == single.total()


def test_the_shard_order_is_one_draw_from_the_rng(shards):
    """What keeps the data order of the stages as it was: one ``rng.sample`` over the shards."""
    rng, again = random.Random(7), random.Random(7)
    first = list(train_stream(shards, 0, 1, rng, holdout_fraction=0.0, prepare=KEY, counter=SkipCounter()))  # fmt: skip
    order = again.sample(shards, len(shards))
    by_shard = [k for uri in order for k in sorted(_keys_of(uri))]
    assert first == by_shard and rng.random() == again.random()


def _keys_of(uri: str) -> set[str]:
    from mmflow.data.webdataset_io import iter_shard

    return {s.key for s in iter_shard(Storage(), uri)}


def test_skips_are_counted_by_reason_over_the_first_pass_only(tmp_path):
    uri = defective_shard(tmp_path / "00000.tar")
    counter = SkipCounter()
    stream = lambda: train_stream(  # noqa: E731
        [uri], 0, 1, random.Random(0), holdout_fraction=0.0, prepare=KEY, counter=counter,
        require_caption=True,
    )  # fmt: skip
    assert list(stream()) == ["a", "f"]
    expected = {
        "samples_seen": 6,
        "skipped_corrupt_json": 1,
        "skipped_empty_caption": 1,
        "skipped_missing_image": 1,
        "skipped_undecodable_image": 1,
    }
    assert counter.counts() == expected
    assert list(stream()) == ["a", "f"] and counter.counts() == expected  # a second epoch
    no_caption_needed = SkipCounter()
    used = train_stream([uri], 0, 1, random.Random(0), holdout_fraction=0.0, prepare=KEY,
                        counter=no_caption_needed)  # fmt: skip
    assert (
        list(used) == ["a", "c", "f"] and "skipped_empty_caption" not in no_caption_needed.counts()
    )


def test_a_tar_that_breaks_off_counts_as_corrupt_tar(tmp_path, shards):
    with open(shards[0], "rb") as f:
        data = f.read()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])
    counter = SkipCounter()
    got = list(train_stream([str(tmp_path / "00000.tar")], 0, 1, random.Random(0),
                            holdout_fraction=0.0, prepare=KEY, counter=counter))  # fmt: skip
    assert 0 < len(got) < 30 and counter.counts()["skipped_corrupt_tar"] == 1
    assert error_kind("corrupt_tar: ReadError: unexpected end of data") == "corrupt_tar"


def test_heldout_set_is_the_first_held_out_samples_in_shard_order(shards, tmp_path):
    keys = [f"{i:09d}" for i in range(20_000)]  # the split: by key, about the asked fraction
    held = [k for k in keys if is_held_out(k, 0.05)]
    assert 0.04 < len(held) / len(keys) < 0.06 and not any(is_held_out(k, 0.0) for k in keys)

    all_held = [k for uri in shards for k in sorted(_keys_of(uri)) if is_held_out(k, 0.3)]
    counter = SkipCounter("heldout_")
    first = load_heldout(shards, holdout_fraction=0.3, limit=5, prepare=KEY, counter=counter)
    assert first == all_held[:5] and counter.counts() == {"heldout_samples_seen": 5}
    every = load_heldout(shards, holdout_fraction=0.3, limit=10_000, prepare=KEY, counter=SkipCounter())  # fmt: skip
    assert every == all_held
    assert load_heldout(shards, holdout_fraction=0.3, limit=0, prepare=KEY, counter=counter) == []

    bad = SkipCounter("heldout_")  # at 0.99, keys a-f are all held out
    uri = defective_shard(tmp_path / "00000.tar")
    got = load_heldout([uri], holdout_fraction=0.99, limit=10, prepare=KEY, counter=bad,
                       require_caption=True)  # fmt: skip
    assert got == ["a", "f"] and bad.counts()["heldout_skipped_undecodable_image"] == 1
    assert bad.counts()["heldout_samples_seen"] == 6


def test_shard_data_from_params_counts_one_pass_and_replays_from_memory(tmp_path):
    from types import SimpleNamespace

    params = SimpleNamespace(holdout_fraction=0.0, eval_samples=3, shuffle_buffer=2, cache_mb=1)
    data = ShardData.from_params([defective_shard(tmp_path / "00000.tar")], params)
    rng = random.Random(0)
    epochs = [sorted(data.epoch(0, 1, rng, KEY, size=len, require_caption=True)) for _ in range(3)]
    assert epochs == [["a", "f"]] * 3 and data.epochs.cached is not None  # replayed
    assert data.heldout(KEY) == []  # nothing held out at 0.0
    assert data.counters() == {
        "samples_seen": 6,
        "skipped_corrupt_json": 1,
        "skipped_empty_caption": 1,
        "skipped_missing_image": 1,
        "skipped_undecodable_image": 1,
        "heldout_samples_seen": 0,
    }
    uncached = ShardData.from_params(data.shards, params)
    for _ in range(2):
        assert sorted(uncached.epoch(0, 1, rng, KEY, size=len, cache=False)) == ["a", "c", "f"]
    assert uncached.epochs.cached is None and uncached.counters()["samples_seen"] == 6


def test_prefetched_keeps_order_and_hands_errors_to_the_consumer():
    import threading

    from mmflow.tasks.data import prefetched

    seen_threads = set()

    def numbers():
        for i in range(50):
            seen_threads.add(threading.current_thread().name)
            yield i

    assert list(prefetched(numbers(), depth=3)) == list(range(50))
    assert seen_threads == {"mmflow-prefetch"}  # made in the thread, not the consumer

    def broken():
        yield 1
        raise ValueError("bad batch 2")

    it = prefetched(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad batch 2"):
        next(it)
