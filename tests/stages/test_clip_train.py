"""clip_train: deterministic hold-out, per-rank data, contrastive loss and retrieval eval, and a real
two-worker DDP run on Ray Train whose model open_clip loads back."""

from __future__ import annotations

import os

import pytest
import torch

from mmflow.config import load_pipeline
from mmflow.data.holdout import is_held_out
from mmflow.data.shards import list_shards
from mmflow.models.clip import WEIGHTS_FILE, model_config
from mmflow.runner import Runner
from mmflow.stages.clip_train import ClipTask, ClipTrainParams
from mmflow.stages.synth_shapes import SynthShapesParams, write_shard
from mmflow.storage import Storage

TINY = {  # smaller than mmflow-clip-tiny: a custom config, as a user would give one inline
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 8,
        "width": 64,
        "head_width": 32,
        "layers": 1,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 24,
        "vocab_size": 49408,
        "width": 32,
        "heads": 1,
        "layers": 1,
        "mlp_ratio": 2.0,
    },
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    p = SynthShapesParams(num_samples=160, samples_per_shard=40, mismatch_fraction=0.25)
    for s in range(4):
        write_shard(s, folder, p, Storage())
    return list_shards(Storage(), folder)


def test_holdout_is_by_key_and_about_the_asked_fraction():
    keys = [f"{i:09d}" for i in range(20_000)]
    held = [k for k in keys if is_held_out(k, 0.05)]
    assert 0.04 < len(held) / len(keys) < 0.06
    assert held == [k for k in keys if is_held_out(k, 0.05)]
    assert not any(is_held_out(k, 0.0) for k in keys[:100])


def test_ranks_read_disjoint_training_samples_without_the_holdout(shards):
    p = ClipTrainParams(holdout_fraction=0.1, train={"batch_size": 8})
    task = ClipTask(shards, p, model_config(p.arch), threads=1)
    import random
    from collections import Counter

    per_rank = [Counter(task._samples(r, 2, random.Random(0))) for r in (0, 1)]
    single = Counter(task._samples(0, 1, random.Random(0)))
    assert (
        per_rank[0] + per_rank[1] == single
        and per_rank[0].total() > 60
        and per_rank[1].total() > 60
    )
    assert 130 < single.total() < 160  # about 10% held out


def test_batches_are_cached_after_one_pass(shards):
    p = ClipTrainParams(holdout_fraction=0.1, shuffle_buffer=16, train={"batch_size": 16})
    task = ClipTask(shards, p, model_config(p.arch), threads=1)
    batches = task.train_batches(0, 1, 0)
    first = next(batches)
    assert first["image"].shape == (16, 3, 32, 32) and first["text"].shape == (16, 24)
    for _ in range(12):  # more than an epoch (about 144 training samples)
        next(batches)
    assert task._epochs.cached is not None and 130 < len(task._epochs.cached) < 160


def test_loss_logit_scale_and_heldout_eval(shards):
    p = ClipTrainParams(holdout_fraction=0.3, eval_samples=64, train={"batch_size": 8})
    task = ClipTask(shards, p, model_config(p.arch), threads=1)
    model = task.build_model()
    batch = next(task.train_batches(0, 1, 0))
    loss, metrics = task.loss(model, batch)
    assert (
        loss.ndim == 0
        and torch.isfinite(loss)
        and metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)
    )
    loss.backward()
    assert model.logit_scale.grad is not None
    with torch.no_grad():
        out = task.evaluate(model.eval())
    assert {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "logit_scale", "num_samples", "roc_auc"} <= set(
        out
    )
    assert 0 < out["num_samples"] <= 64 and 0 <= out["i2t_r1"] <= out["i2t_r5"] <= 1


def test_ddp_on_two_workers_saves_a_model_open_clip_loads(ray_session, write_pipeline):
    import json

    import open_clip
    from mlflow import MlflowClient

    path = write_pipeline(f"""
    synth:
      type: synth_shapes
      params: {{num_samples: 256, samples_per_shard: 64}}
    clip:
      type: clip_train
      inputs: {{shards: synth}}
      params:
        arch: test-clip-custom
        model_cfg: {json.dumps(TINY)}
        eval_samples: 64
        holdout_fraction: 0.1
        train: {{max_steps: 6, batch_size: 16, warmup_steps: 2, checkpoint_every: 3, log_every: 2}}
      resources: {{workers: 2, cpus: 1}}
    """)
    runner = Runner(load_pipeline(path))
    runner.run()
    man = runner.manifest("clip")
    folder = man["outputs"]["model"]["uri"]
    assert (
        man["outputs"]["model"]["arch"] == "test-clip-custom"
        and man["outputs"]["model"]["steps"] == 6
    )
    for k in (
        "final_loss",
        "heldout_i2t_r1",
        "heldout_t2i_r5",
        "heldout_logit_scale",
        "heldout_roc_auc",
    ):
        assert k in man["metrics"], man["metrics"]

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    open_clip.add_model_config(os.path.join(folder, "test-clip-custom.json"))
    again, _, _ = open_clip.create_model_and_transforms(
        "test-clip-custom", pretrained=os.path.join(folder, WEIGHTS_FILE)
    )
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(x), again.eval().encode_image(x))
    assert model.visual.preprocess_cfg["size"] in (32, (32, 32), [32, 32])

    client = MlflowClient(runner.p.tracking_uri)
    run = man["mlflow_run_id"]
    assert {"model/open_clip_config.json", f"model/{WEIGHTS_FILE}"} <= {
        a.path for a in client.list_artifacts(run, "model")
    }
    assert [m.step for m in client.get_metric_history(run, "train/logit_scale")] == [2, 4, 6]
