"""tasks.clip: per-rank training pairs without the hold-out, batches cached after one pass, the
contrastive loss and logit scale, retrieval eval on held-out pairs, and skips counted."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from mmflow.data.holdout import is_held_out
from mmflow.data.shards import list_shards
from mmflow.models.clip import model_config
from mmflow.stages.synth_shapes import SynthShapesParams, write_shard
from mmflow.storage import Storage
from mmflow.tasks.clip import ClipTask
from mmflow.tasks.data import ShardData
from mmflow.train.config import TrainConfig
from tests.tasks.test_data import defective_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    p = SynthShapesParams(num_samples=160, samples_per_shard=40, mismatch_fraction=0.25)
    for s in range(4):
        write_shard(s, folder, p, Storage())
    return list_shards(Storage(), folder)


def make_task(shards, batch_size=8, **data) -> ClipTask:
    settings = {"holdout_fraction": 0.1, "eval_samples": 1000, "shuffle_buffer": 2048, "cache_mb": 1024}  # fmt: skip
    return ClipTask(
        ShardData(shards, **{**settings, **data}),
        arch="mmflow-clip-tiny",
        model_cfg=model_config("mmflow-clip-tiny"),
        train=TrainConfig(batch_size=batch_size),
    )


def test_ranks_read_disjoint_training_pairs_without_the_holdout(shards):
    def tokens(rank, world):  # each example's token ids, a stand-in for the pair; a fresh task each
        epoch = make_task(shards)._epoch(rank, world, random.Random(0))
        return Counter(tuple(t.tolist()) for _, t in epoch)

    per_rank, single = [tokens(r, 2) for r in (0, 1)], tokens(0, 1)
    assert per_rank[0] + per_rank[1] == single
    assert per_rank[0].total() > 60 and per_rank[1].total() > 60
    assert 130 < single.total() < 160  # about 10% held out


def test_batches_are_cached_after_one_pass(shards):
    task = make_task(shards, batch_size=16, shuffle_buffer=16)
    batches = task.train_batches(0, 1, 0)
    first = next(batches)
    assert first["image"].shape == (16, 3, 32, 32) and first["text"].shape == (16, 24)
    for _ in range(12):  # more than an epoch (about 144 training samples)
        next(batches)
    assert task.data.epochs.cached is not None and 130 < len(task.data.epochs.cached) < 160
    seen = task.data_counters()["samples_seen"]
    assert seen == len(task.data.epochs.cached)  # one pass counted, not one per epoch


def test_loss_logit_scale_and_heldout_eval(shards):
    task = make_task(shards, holdout_fraction=0.3, eval_samples=64)
    model = task.build_model()
    batch = next(task.train_batches(0, 1, 0))
    loss, metrics = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)
    loss.backward()
    assert model.logit_scale.grad is not None
    with torch.no_grad():
        out = task.evaluate(model.eval())
    expected = {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "logit_scale", "num_samples", "roc_auc"}
    assert expected <= set(out)
    assert 0 < out["num_samples"] <= 64 and 0 <= out["i2t_r1"] <= out["i2t_r5"] <= 1
    assert task.data_counters()["heldout_samples_seen"] == len(task.heldout_set()[2])  # all good


def test_unusable_pairs_are_skipped_and_counted(tmp_path):
    """Needs captions: of 6 pairs, a and f train; b (undecodable), c (blank caption), d (no
    image) and e (corrupt json) are counted. At 0.99 all six are held out: the held-out counts."""
    uri = defective_shard(tmp_path / "00000.tar")
    task = make_task([uri], holdout_fraction=0.0)
    assert len(list(task._epoch(0, 1, random.Random(0)))) == 2
    counts = task.data_counters()
    assert counts["samples_seen"] == 6 and counts["skipped_undecodable_image"] == 1
    assert counts["skipped_empty_caption"] == counts["skipped_missing_image"] == 1
    assert all(is_held_out(k, 0.99) for k in "abcdef")
    held = make_task([uri], holdout_fraction=0.99, eval_samples=10)
    images, texts, truth = held.heldout_set()
    assert images.shape[0] == texts.shape[0] == 2 and truth == [None, None]
    assert held.data_counters()["heldout_skipped_undecodable_image"] == 1
