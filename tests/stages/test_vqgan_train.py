"""vqgan_train: params checked at load, per-rank data and the hold-out, the step riding with
each batch, the perceptual network's sources, held-out metrics, a real two-worker DDP run on
Ray Train whose model is in the stage's folder and in the MLflow registry, and a resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mmflow.config import ConfigError, load_pipeline
from mmflow.data.holdout import is_held_out
from mmflow.data.shards import list_shards
from mmflow.models.clip import save_clip
from mmflow.models.perceptual import PerceptualSpec, build_perceptual, perceptual_plan
from mmflow.models.vqgan import load_vqgan
from mmflow.models.vqgan_losses import ClipPerceptual
from mmflow.models.vqgan_mlflow import load_registered_vqgan
from mmflow.runner import Runner
from mmflow.stage import Dataset, Resources, Stage, StageContext
from mmflow.stages.synth_shapes import SynthShapesParams, write_shard
from mmflow.stages.vqgan_train import VqganTask, VqganTrainParams
from mmflow.storage import Storage

TINY_CFG = {
    "image_size": 16,
    "channels": 8,
    "channel_mult": [1, 2],
    "z_channels": 16,
    "codebook_size": 32,
    "codebook_dim": 4,
}
TINY_LOSS = {"disc_start": 2, "disc_layers": 1, "disc_channels": 8, "restart_every": 2}


class LocalShards(Stage):
    """96 synthetic 16 px samples in 3 shards, written in the driver (no Ray tasks to start)."""

    type = "test_vqgan_local_shards"
    outputs = {"shards": "shards"}

    def run(self, ctx: StageContext) -> None:
        p = SynthShapesParams(num_samples=96, samples_per_shard=32, image_size=16)
        for s in range(3):
            write_shard(s, ctx.outputs["shards"], p, ctx.storage)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    p = SynthShapesParams(num_samples=96, samples_per_shard=32, image_size=16)
    for s in range(3):
        write_shard(s, folder, p, Storage())
    return list_shards(Storage(), folder)


def params(**kw) -> VqganTrainParams:
    base = {"model_cfg": TINY_CFG, "loss": TINY_LOSS, "holdout_fraction": 0.2, "eval_samples": 32}
    return VqganTrainParams(**{**base, **kw})


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


def test_ranks_read_disjoint_training_images_and_never_the_holdout(shards):
    task = VqganTask(shards, params(), None, threads=1, tracking_uri="", run_id=None)
    keys = lambda rank, world, uris: Counter(  # noqa: E731
        k for k, _ in task._decoded(uris, False, rank, world)
    )
    single = keys(0, 1, shards)
    assert not any(is_held_out(k, 0.2) for k in single)
    assert 60 < single.total() < 90
    by_shard = [keys(r, 2, shards[r::2]) for r in (0, 1)]  # 3 shards, 2 ranks: whole shards
    assert by_shard[0] + by_shard[1] == single
    many = VqganTask(shards[:1], params(), None, threads=1, tracking_uri="", run_id=None)
    by_sample = [Counter(k for k, _ in many._decoded(shards[:1], False, r, 4)) for r in range(4)]
    assert sum(by_sample, Counter()) == Counter(k for k, _ in many._decoded(shards[:1], False))
    assert all(c.total() > 0 for c in by_sample)


def test_batches_carry_the_optimizer_step_and_are_cached_after_one_pass(shards):
    p = params(train={"batch_size": 8, "grad_accum": 2})
    task = VqganTask(shards, p, None, threads=1, tracking_uri="", run_id=None)
    batches = task.train_batches(0, 1, start_step=3)
    first = [next(batches) for _ in range(20)]  # past one epoch of ~77 images
    assert first[0]["image"].shape == (8, 3, 16, 16) and first[0]["image"].dtype == torch.float32
    assert first[0]["image"].min() >= -1 and first[0]["image"].max() <= 1
    assert [b["step"] for b in first[:6]] == [3, 3, 4, 4, 5, 5]
    assert task._epochs.cached is not None and 60 < len(task._epochs.cached) < 90


def test_evaluate_reports_heldout_quality_and_codebook_usage(shards):
    task = VqganTask(shards, params(), None, threads=1, tracking_uri="", run_id=None)
    model = task.build_model().eval()
    with torch.no_grad():
        out = task.evaluate(model)
    assert set(out) == {"psnr", "ssim", "codebook_usage", "perplexity", "num_samples"}
    assert 0 < out["num_samples"] <= 32 and 0 < out["codebook_usage"] <= 1
    assert 1 <= out["perplexity"] <= 32 and out["psnr"] > 0


def _ctx(tmp_path, inputs: dict, run_id=None) -> StageContext:
    return StageContext(
        pipeline="p",
        stage="vq",
        params=None,
        resources=Resources(cpus=1, workers=1),
        inputs=inputs,
        outputs={"model": str(tmp_path / "out" / "model")},
        work_uri=str(tmp_path / "work"),
        storage=Storage(),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        run_id=run_id,
    )


def test_perceptual_network_from_a_wired_clip_from_params_or_none(tmp_path):
    import open_clip

    from mmflow.models.clip import model_config

    cfg = model_config("mmflow-clip-tiny")
    torch.manual_seed(0)
    save_clip(
        open_clip.create_model("mmflow-clip-tiny"), "mmflow-clip-tiny", cfg, str(tmp_path / "clip")
    )
    wired = Dataset(
        "clip_train", "model", "model", str(tmp_path / "clip"), "f" * 16, {"mlflow_run_id": "r1"}
    )
    ctx_in, ctx_none = _ctx(tmp_path, {"clip": wired}), _ctx(tmp_path, {})

    plan = perceptual_plan(PerceptualSpec(), ctx_in)  # auto + a wired CLIP -> that CLIP
    assert plan == {"kind": "clip", "spec": None, "uri": str(tmp_path / "clip"), "run_id": "r1"}
    assert isinstance(build_perceptual(plan), ClipPerceptual)
    assert perceptual_plan(PerceptualSpec(), ctx_none) is None  # auto, nothing wired
    assert perceptual_plan(PerceptualSpec(weight=0), ctx_in) is None
    named = perceptual_plan(
        PerceptualSpec(kind="clip", clip={"arch": "mmflow-clip-tiny"}), ctx_none
    )
    assert named["spec"]["arch"] == "mmflow-clip-tiny" and named["uri"] is None
    assert isinstance(build_perceptual(named), ClipPerceptual)
    with pytest.raises(ValueError, match="keep one"):
        perceptual_plan(PerceptualSpec(clip={"arch": "mmflow-clip-tiny"}), ctx_in)
    with pytest.raises(ValueError, match="needs a `clip` input"):
        perceptual_plan(PerceptualSpec(kind="clip"), ctx_none)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        perceptual_plan(
            PerceptualSpec(kind="lpips", vgg_weights=str(tmp_path / "nope.pth")), ctx_none
        )


def test_ddp_on_two_workers_logs_metrics_pictures_and_registers_the_model(
    ray_session, write_pipeline
):
    """Also: a pretokenize param change leaves the VQ-GAN's fingerprint, so it stays cached
    (test_pretokenize reruns pretokenize alone after such a change)."""
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
    out = man["outputs"]["model"]
    facts = (out["codebook_size"], out["grid_h"], out["steps"], out["perceptual"])
    assert facts == (32, 8, 4, "none")
    assert (out["registered_model"], out["registered_version"]) == ("vqt-vq", 1)

    model, preprocess, info = load_vqgan(out["uri"])
    assert preprocess.image_size == 16 and info["steps"] == 4
    registered = load_registered_vqgan("vqt-vq", 1, runner.p.tracking_uri)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(registered.eval().tokenize(x), model.tokenize(x))

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


def test_checkpointed_state_restores_codebook_usage_and_discriminator(shards):
    """What a resume loads (the harness checkpoints ``module.state_dict()``) is the whole
    training state: weights, the codebook usage EMA and the discriminator."""
    task = VqganTask(shards, params(), None, threads=1, tracking_uri="", run_id=None)
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
