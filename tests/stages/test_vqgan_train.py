"""vqgan_train: params checked at load, the perceptual network's sources, and a real two-worker
DDP run on Ray Train whose model is in the stage's folder and in the MLflow registry, with an
undecodable image in the data counted in the stage's metrics. The task itself (data, loss,
eval, checkpointed state) is tested in tests/tasks/test_vqgan.py."""

from __future__ import annotations

import pytest
import torch

from mmflow.config import ConfigError, load_pipeline
from mmflow.data.holdout import is_held_out
from mmflow.data.shards import ShardWriter, sample_key
from mmflow.export.mlflow import download_registered
from mmflow.models.clip import save_clip
from mmflow.models.perceptual import PerceptualSpec, build_perceptual, perceptual_plan
from mmflow.models.vqgan import load_vqgan
from mmflow.models.vqgan_losses import ClipPerceptual
from mmflow.runner import Runner
from mmflow.stage import Stage, StageContext
from mmflow.stages.synth_shapes import SynthShapesParams, make_sample, write_shard

TINY_CFG = {
    "image_size": 16,
    "channels": 8,
    "channel_mult": [1, 2],
    "z_channels": 16,
    "codebook_size": 32,
    "codebook_dim": 4,
}


class LocalShards(Stage):
    """96 synthetic 16 px samples in 3 shards, and a fourth shard of 3 whose second image does
    not decode; written in the driver (no Ray tasks to start)."""

    type = "test_vqgan_local_shards"
    outputs = {"shards": "shards"}

    def run(self, ctx: StageContext) -> None:
        p = SynthShapesParams(num_samples=96, samples_per_shard=32, image_size=16)
        for s in range(3):
            write_shard(s, ctx.outputs["shards"], p, ctx.storage)
        with ShardWriter(ctx.storage, ctx.outputs["shards"], 3) as w:
            for i in range(3):
                image = make_sample(1, i, p)[0] if i != 1 else b"\x89PNG but not an image"
                row = {"key": sample_key(3, i), "caption": f"picture {i}"}
                w.write(row, image, p.image_format)


BAD_KEY = sample_key(3, 1)


def test_params_are_checked_when_the_pipeline_loads(write_pipeline):
    for bad, needle in (
        ("{arch: vqgan-nope}", "unknown VQ-GAN architecture"),
        ("{model_cfg: {codebook_sise: 3}}", "unknown VQ-GAN config keys"),
        ("{train: {strategy: deepspeed}}", "strategy 'ddp' only"),
        ("{loss: {perceptual: {kind: lpips}}}", "vgg_weights"),
    ):
        path = write_pipeline(f"""
        synth: {{type: synth_shapes}}
        vq: {{type: vqgan_train, inputs: {{shards: synth}}, params: {bad}}}
        """)
        with pytest.raises(ConfigError) as e:
            load_pipeline(path)
        assert needle in str(e.value), str(e.value)
    path = write_pipeline("""
    synth: {type: synth_shapes}
    vq: {type: vqgan_train, inputs: {shards: synth}}
    """)
    assert load_pipeline(path).stages["vq"].params.arch == "vqgan-tiny-f4"  # `clip` is optional


def test_perceptual_network_from_a_wired_clip_from_params_or_none(tmp_path, capsys):
    import open_clip

    from mmflow.models.clip import model_config

    cfg = model_config("mmflow-clip-tiny")
    torch.manual_seed(0)
    save_clip(
        open_clip.create_model("mmflow-clip-tiny"), "mmflow-clip-tiny", cfg, str(tmp_path / "clip")
    )
    wired = (str(tmp_path / "clip"), "r1")  # a wired `clip` input: its folder and MLflow run

    plan = perceptual_plan(PerceptualSpec(), *wired)  # auto + a wired CLIP -> that CLIP
    assert plan == {"kind": "clip", "spec": None, "uri": str(tmp_path / "clip"), "run_id": "r1"}
    assert isinstance(build_perceptual(plan), ClipPerceptual)
    assert perceptual_plan(PerceptualSpec()) is None  # auto, nothing wired
    assert perceptual_plan(PerceptualSpec(weight=0), *wired, stage="vq") is None
    assert "[vq] note: the `clip` input is unused" in capsys.readouterr().out
    named = perceptual_plan(PerceptualSpec(kind="clip", clip={"arch": "mmflow-clip-tiny"}))
    assert named["spec"]["arch"] == "mmflow-clip-tiny" and named["uri"] is None
    assert isinstance(build_perceptual(named), ClipPerceptual)
    with pytest.raises(ValueError, match="keep one"):
        perceptual_plan(PerceptualSpec(clip={"arch": "mmflow-clip-tiny"}), *wired)
    with pytest.raises(ValueError, match="needs a `clip` input"):
        perceptual_plan(PerceptualSpec(kind="clip"))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        perceptual_plan(PerceptualSpec(kind="lpips", vgg_weights=str(tmp_path / "nope.pth")))


def test_ddp_on_two_workers_counts_the_undecodable_image_and_registers_the_model(
    ray_session, write_pipeline
):
    """The acceptance test for counted skips: one undecodable image among the shards is
    ``skipped_undecodable_image == 1`` in the committed manifest's metrics (counted by the rank
    that read it, summed over both ranks by the harness). Also: metrics, pictures, the
    registered model, and a pretokenize param change that leaves the VQ-GAN's fingerprint, so it
    stays cached (test_pretokenize reruns pretokenize alone after such a change)."""
    import json

    from mlflow import MlflowClient

    path = write_pipeline(
        f"""
    synth:
      type: tests.stages.test_vqgan_train:LocalShards
    vq:
      type: vqgan_train
      inputs: {{shards: synth}}
      params:
        model_cfg: {json.dumps(TINY_CFG)}
        holdout_fraction: 0.2
        eval_samples: 32
        preview: 4
        loss: {{disc_start: 2, disc_layers: 1, disc_channels: 8, restart_every: 2}}
        train: {{max_steps: 4, batch_size: 8, warmup_steps: 1, checkpoint_every: 2, eval_every: 2, log_every: 1}}
      resources: {{workers: 2, cpus: 1}}
    tok:
      type: pretokenize
      inputs: {{shards: synth, model: vq}}
      params: {{vocab_size: 300, preview: 0}}
    """,
        name="vqt",
    )
    runner = Runner(load_pipeline(path))
    runner.run(only=["synth", "vq"])
    man = runner.manifest("vq")
    for k in ("val_psnr", "val_ssim", "val_codebook_usage", "val_perplexity", "final_loss"):
        assert k in man["metrics"], man["metrics"]
    assert 0 < man["metrics"]["val_codebook_usage"] <= 1
    assert not is_held_out(BAD_KEY, 0.2)  # a training sample: the training loader meets it
    assert man["metrics"]["skipped_undecodable_image"] == 1
    assert man["metrics"]["skipped_total"] == 1
    held = sum(is_held_out(sample_key(s, i), 0.2) for s in range(3) for i in range(32))
    assert man["metrics"]["samples_seen"] == 96 - held + 3  # both ranks, the defect included
    out = man["outputs"]["model"]
    facts = (out["codebook_size"], out["grid_h"], out["steps"], out["perceptual"])
    assert facts == (32, 8, 4, "none")
    assert (out["registered_model"], out["registered_version"]) == ("vqt-vq", 1)

    model, preprocess, info = load_vqgan(out["uri"])
    assert preprocess.image_size == 16 and info["steps"] == 4
    registered, _, _ = load_vqgan(download_registered("vqt-vq", 1, runner.p.tracking_uri))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(registered.tokenize(x), model.tokenize(x))

    client = MlflowClient(runner.p.tracking_uri)
    run = man["mlflow_run_id"]
    pictures = {a.path for a in client.list_artifacts(run, "images/reconstructions")}
    assert pictures == {f"images/reconstructions/step_{s:06d}.png" for s in (2, 4)}
    assert "model/vqgan.pt" in {a.path for a in client.list_artifacts(run, "model")}
    assert [m.step for m in client.get_metric_history(run, "eval/psnr")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run, "train/g_loss")] == [3, 4]

    changed = Runner(load_pipeline(path, ["tok.params.vocab_size=280"]))
    states = {r.name: (r.state, r.fingerprint) for r in changed.status()}
    assert states["vq"] == ("done", runner.fingerprints["vq"])
    assert states["tok"] == ("missing", changed.fingerprints["tok"])
    assert changed.fingerprints["tok"] != runner.fingerprints["tok"]
