"""tasks.vqgan: per-rank images without the hold-out, the step riding with each batch, held-out
metrics, the whole training state in a checkpoint, and undecodable images counted."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from mmflow.data.holdout import is_held_out
from mmflow.data.shards import list_shards
from mmflow.models.vqgan import vqgan_config
from mmflow.models.vqgan_losses import VQGANLossConfig
from mmflow.stages.synth_shapes import SynthShapesParams, write_shard
from mmflow.storage import Storage
from mmflow.tasks.data import ShardData
from mmflow.tasks.vqgan import VqganTask
from mmflow.train.config import TrainConfig
from tests.tasks.test_data import defective_shard

TINY_CFG = {
    "image_size": 16,
    "channels": 8,
    "channel_mult": [1, 2],
    "z_channels": 16,
    "codebook_size": 32,
    "codebook_dim": 4,
}
TINY_LOSS = VQGANLossConfig(disc_start=2, disc_layers=1, disc_channels=8, restart_every=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    p = SynthShapesParams(num_samples=96, samples_per_shard=32, image_size=16)
    for s in range(3):
        write_shard(s, folder, p, Storage())
    return list_shards(Storage(), folder)


def make_task(shards, train=None, **data) -> VqganTask:
    settings = {"holdout_fraction": 0.2, "eval_samples": 32, "shuffle_buffer": 2048, "cache_mb": 1024}  # fmt: skip
    return VqganTask(
        ShardData(shards, **{**settings, **data}),
        arch="vqgan-tiny-f4",
        model=vqgan_config("vqgan-tiny-f4", TINY_CFG),
        loss=TINY_LOSS,
        perceptual=None,
        train=TrainConfig(**(train or {"batch_size": 8})),
        preview=4,
    )


def test_ranks_read_disjoint_training_images_and_never_the_holdout(shards):
    task = make_task(shards)

    def images(rank, world):  # each image's bytes, a stand-in for its key; a fresh task each
        epoch = make_task(shards)._epoch(rank, world, random.Random(0))
        return Counter(t.numpy().tobytes() for t in epoch)

    single = images(0, 1)
    assert 60 < single.total() < 90
    assert sum((images(r, 2) for r in (0, 1)), Counter()) == single  # whole shards
    by_sample = [images(r, 4) for r in range(4)]  # 3 shards, 4 ranks: every 4th sample
    assert sum(by_sample, Counter()) == single and all(c.total() > 0 for c in by_sample)
    held = sum(is_held_out(f"{s:05d}{i:04d}", 0.2) for s in range(3) for i in range(32))
    assert len(list(task._epoch(0, 1, random.Random(0)))) == 96 - held
    assert task.data_counters() == {"samples_seen": 96 - held, "heldout_samples_seen": 0}


def test_batches_carry_the_optimizer_step_and_are_cached_after_one_pass(shards):
    task = make_task(shards, train={"batch_size": 8, "grad_accum": 2})
    batches = task.train_batches(0, 1, start_step=3)
    first = [next(batches) for _ in range(20)]  # past one epoch of ~77 images
    assert first[0]["image"].shape == (8, 3, 16, 16) and first[0]["image"].dtype == torch.float32
    assert first[0]["image"].min() >= -1 and first[0]["image"].max() <= 1
    assert [b["step"] for b in first[:6]] == [3, 3, 4, 4, 5, 5]
    assert task.data.epochs.cached is not None and 60 < len(task.data.epochs.cached) < 90


def test_evaluate_reports_heldout_quality_and_codebook_usage(shards):
    task = make_task(shards)
    model = task.build_model().eval()
    with torch.no_grad():
        out = task.evaluate(model)
    assert set(out) == {"psnr", "ssim", "codebook_usage", "perplexity", "num_samples"}
    assert 0 < out["num_samples"] <= 32 and 0 < out["codebook_usage"] <= 1
    assert 1 <= out["perplexity"] <= 32 and out["psnr"] > 0
    assert task.data_counters()["heldout_samples_seen"] >= out["num_samples"]
    assert make_task(shards, eval_samples=0).evaluate(model) == {}


def test_evaluation_in_chunks_matches_one_pass(shards, monkeypatch):
    import mmflow.tasks.evaluation as evaluation

    task = make_task(shards, holdout_fraction=0.5, eval_samples=40)
    model = task.build_model().eval()
    with torch.no_grad():
        whole = task.evaluate(model)
        monkeypatch.setattr(evaluation, "EVAL_CHUNK", 7)
        assert task.evaluate(model) == pytest.approx(whole, rel=1e-5)


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    """No caption needed: a, c and f train; b (undecodable), d (no image), e (corrupt json)."""
    task = make_task([defective_shard(tmp_path / "00000.tar")], holdout_fraction=0.0)
    assert len(list(task._epoch(0, 1, random.Random(0)))) == 3
    counts = task.data_counters()
    assert counts["samples_seen"] == 6 and counts["skipped_undecodable_image"] == 1
    assert counts["skipped_missing_image"] == counts["skipped_corrupt_json"] == 1


def test_checkpointed_state_restores_codebook_usage_and_discriminator(shards):
    """What a resume loads (the harness checkpoints ``module.state_dict()``) is the whole
    training state: weights, the codebook usage EMA and the discriminator."""
    task = make_task(shards)
    model = task.build_model()
    batch = next(task.train_batches(0, 1, start_step=0))
    loss, _ = model(batch["image"], 2)  # a restart step, usage tracked
    loss.backward()
    assert "vqgan.quantizer.usage" in model.state_dict() and model.vqgan.quantizer.usage.sum() > 0
    again = task.build_model()
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.vqgan.quantizer.usage, model.vqgan.quantizer.usage)
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(
            model.vqgan.tokenize(batch["image"]), again.vqgan.tokenize(batch["image"])
        )
        d = model.discriminator(batch["image"])
        assert torch.equal(d, again.discriminator(batch["image"]))
    resumed = task.train_batches(0, 1, start_step=7)
    assert next(resumed)["step"] == 7  # the schedule (GAN start, restarts) continues
