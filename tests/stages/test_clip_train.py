"""clip_train: a real two-worker DDP run on Ray Train whose model open_clip loads back, with the
stage's metrics (held-out retrieval, what the loaders read and skipped) and the model logged to
MLflow. The task itself (data, loss, eval) is tested in tests/tasks/test_clip.py."""

from __future__ import annotations

import os

import torch

from mmflow.config import load_pipeline
from mmflow.data.holdout import is_held_out
from mmflow.models.clip import WEIGHTS_FILE
from mmflow.runner import Runner

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
    # both ranks' counts, summed: every key of the 4 shards is read once, by one rank
    held = sum(is_held_out(f"{s:05d}{i:04d}", 0.1) for s in range(4) for i in range(64))
    assert man["metrics"]["samples_seen"] == 256 - held
    assert man["metrics"]["skipped_total"] == 0 and man["metrics"]["heldout_skipped_total"] == 0
    assert 0 < man["metrics"]["heldout_samples_seen"] <= 64

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
    assert man["outputs"]["model"]["mlflow_model_uri"] == f"runs:/{run}/model"
    assert {"model/open_clip_config.json", f"model/{WEIGHTS_FILE}"} <= {
        a.path for a in client.list_artifacts(run, "model")
    }
    assert [m.step for m in client.get_metric_history(run, "train/logit_scale")] == [2, 4, 6]
