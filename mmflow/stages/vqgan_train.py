"""``vqgan_train``: train a VQ-GAN image tokenizer on a shard dataset.

The model is a named architecture (``vqgan-tiny-f4`` by default; see
``mmflow/models/configs/vqgan-*.json``) with optional field overrides in
``model_cfg``. It trains as :class:`mmflow.tasks.vqgan.VqganTask` through the shared
harness (:mod:`mmflow.train`): DDP on Ray Train, any number of workers, checkpoints and
resume.

The perceptual loss's feature network is ``loss.perceptual.kind``: ``auto`` (the
default) uses the CLIP image tower wired as the optional ``clip`` input (e.g.
``clip_train``'s model) and nothing otherwise; ``clip`` can also name a CLIP in
``loss.perceptual.clip``; ``lpips`` reads VGG16 (and LPIPS) weights from local
files; ``none`` turns it off.

A deterministic slice of keys (by hash, as in ``clip_train``) is held out: at each
evaluation rank 0 logs ``psnr`` (dB, against the decoded input in [0, 1]), ``ssim``,
``codebook_usage`` (the fraction of codes the held-out images use) and ``perplexity``, and
a picture of originals above their reconstructions. The final values become the stage's
``val_*`` metrics (manifest and ``mmflow status``), beside ``final_loss`` and what the
loaders read and skipped: ``samples_seen``, ``skipped_<reason>``, ``skipped_total`` and the
same with ``heldout_`` (:mod:`mmflow.tasks.evaluation`).

The output ``model`` is a folder :func:`mmflow.models.vqgan.load_vqgan` reads; the
driver also logs that folder to the stage's MLflow run and registers it in the model
registry (``registered_model_name``; :func:`mmflow.export.mlflow.publish_model`). Load a
registered version with ``load_vqgan(download_registered(name, version, tracking_uri))``:
weights only, nothing unpickled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from mmflow.data.shards import list_shards
from mmflow.export.mlflow import publish_model
from mmflow.models.perceptual import PerceptualSpec, perceptual_plan
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.tasks.data import ShardData
from mmflow.tasks.evaluation import stage_metrics
from mmflow.tasks.vqgan import VqganTask
from mmflow.train import TrainConfig, fit
from mmflow.train.harness import absolute_tracking_uri

if TYPE_CHECKING:  # the model code imports torch; this module stays light for config loading
    from mmflow.models.vqgan_config import VQGANConfig
    from mmflow.models.vqgan_losses import VQGANLossConfig


# defaults that train ``vqgan-tiny-f4`` on the quickstart in about four minutes on two CPUs
# (small batches: more updates for the same compute)
VqganTrainConfig = TrainConfig.with_defaults(
    "VqganTrainConfig", "The harness's config, with vqgan_train's defaults.",
    max_steps=1200, batch_size=32, lr=3e-3, weight_decay=0.0, warmup_steps=50,
    checkpoint_every=400, eval_every=400, log_every=25,
)  # fmt: skip


class VqganLossParams(Params):
    """The losses (see mmflow.models.vqgan_losses.VQGANLossConfig)."""

    pixel: Literal["l1", "l2"] = Field("l1", description="reconstruction distance")
    pixel_weight: float = Field(1.0, ge=0)
    codebook_weight: float = Field(1.0, ge=0, description="codebook + commitment loss weight")
    perceptual: PerceptualSpec = Field(default_factory=PerceptualSpec)
    disc_weight: float = Field(0.1, ge=0, description="adversarial weight; 0 = no GAN")
    disc_start: int = Field(900, ge=0, description="step at which the discriminator starts")
    disc_layers: int = Field(2, ge=1, le=5, description="PatchGAN stride-2 layers")
    disc_channels: int = Field(64, ge=8)
    adaptive_weight: bool = Field(True, description="balance by gradient norms at the last layer")
    restart_every: int = Field(25, ge=0, description="dead-code restart period, steps; 0 = off")
    restart_until: float = Field(
        0.8, ge=0, le=1, description="no restarts after this fraction of max_steps"
    )

    def build(self, max_steps: int) -> VQGANLossConfig:
        from mmflow.models.vqgan_losses import VQGANLossConfig

        fields = self.model_dump(exclude={"perceptual", "restart_until"})
        return VQGANLossConfig(
            **fields,
            perceptual_weight=self.perceptual.weight,
            restart_until=int(self.restart_until * max_steps),
        )


class VqganTrainParams(Params):
    arch: str = Field("vqgan-tiny-f4", description="VQ-GAN architecture (configs/vqgan-*.json)")
    model_cfg: dict[str, Any] | None = Field(
        None, description="architecture fields to override, e.g. {codebook_size: 1024}"
    )
    train: VqganTrainConfig = Field(default_factory=VqganTrainConfig)
    loss: VqganLossParams = Field(default_factory=VqganLossParams)
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of keys held out")
    eval_samples: int = Field(2000, ge=0, description="held-out images evaluated (0 = no eval)")
    preview: int = Field(16, ge=0, description="held-out images in the logged reconstruction grid")
    shuffle_buffer: int = Field(2048, ge=1, description="samples shuffled together while streaming")
    cache_mb: int = Field(
        1024, ge=0, description="per worker: keep decoded images in memory (uint8)"
    )
    registered_model_name: str | None = Field(
        None, description="MLflow registry name; default '{pipeline}-{stage}'; '' = do not register"
    )

    @model_validator(mode="after")
    def _check(self) -> VqganTrainParams:
        self.model_config_()  # unknown architecture or bad fields fail at load
        if self.train.strategy != "ddp":
            raise ValueError(
                "vqgan_train supports strategy 'ddp' only (the GAN loss calls the discriminator "
                "functionally, which ZeRO's partitioned parameters do not allow)"
            )
        return self

    def model_config_(self) -> VQGANConfig:
        from mmflow.models.vqgan_config import vqgan_config

        return vqgan_config(self.arch, self.model_cfg)


@register
class VqganTrain(Stage):
    type = "vqgan_train"
    version = "1"
    description = "Train a VQ-GAN image tokenizer (l2-normalised codes, PatchGAN, perceptual loss) with the DDP harness."
    Params = VqganTrainParams
    inputs = {"shards": "shards", "clip": "model"}
    optional_inputs = frozenset({"clip"})  # the perceptual loss's CLIP; or params, or none
    outputs = {"model": "model"}
    resources = Resources(cpus=2, workers=1)
    resumable = True  # a rerun resumes from the newest complete checkpoint in _work

    def run(self, ctx: StageContext) -> None:
        from mmflow.models.vqgan import describe

        p: VqganTrainParams = ctx.params
        cfg = p.model_config_()
        shards = list_shards(ctx.storage, ctx.inputs["shards"].uri)
        if not shards:
            raise ValueError(f"no .tar shards in {ctx.inputs['shards'].uri}")
        clip = ctx.inputs.get("clip")
        plan = perceptual_plan(
            p.loss.perceptual,
            clip.uri if clip is not None else None,
            clip.manifest.get("mlflow_run_id") if clip is not None else None,
            ctx.stage,
        )
        print(f"[{ctx.stage}] {p.arch}: {describe(cfg)}; perceptual {plan['kind'] if plan else 'none'}; "
              f"{len(shards)} shards, {ctx.resources.workers} worker(s)", flush=True)  # fmt: skip
        task = VqganTask(
            ShardData.from_params(shards, p),
            arch=p.arch,
            model=cfg,
            loss=p.loss.build(p.train.max_steps),
            perceptual=plan,
            train=p.train,
            preview=p.preview,
            threads=max(1, int(ctx.resources.cpus)),
            tracking_uri=absolute_tracking_uri(ctx.tracking_uri),
            run_id=ctx.run_id,
        )
        final = fit(task, p.train, ctx, model_output="model")
        ctx.log_metrics(stage_metrics(final, eval_prefix="val"))
        name = p.registered_model_name
        name = f"{ctx.pipeline}-{ctx.stage}" if name is None else name
        registered = publish_model(
            ctx.outputs["model"],
            ctx.tracking_uri,
            ctx.run_id,
            name or None,
            "mmflow VQ-GAN image tokenizer",
            storage=ctx.storage,
        )
        g = cfg.grid_size
        ctx.record_output(
            "model",
            arch=p.arch,
            format="mmflow-vqgan",
            codebook_size=cfg.codebook_size,
            image_size=cfg.image_size,
            grid_h=g,
            grid_w=g,
            steps=int(final.get("step", 0)),
            perceptual=plan["kind"] if plan else "none",
            load="mmflow.models.vqgan.load_vqgan('<this folder>')",
            **registered,
        )
        summary = ", ".join(
            f"{k}={final[k]:.4g}"
            for k in ("eval/psnr", "eval/ssim", "eval/codebook_usage")
            if k in final
        )
        skipped = f"{ctx.metrics['skipped_total']:.0f} of {final.get('data/samples_seen', 0):.0f}"
        print(
            f"[{ctx.stage}] trained {int(final.get('step', 0))} steps; held-out {summary}; "
            f"training samples skipped: {skipped}",
            flush=True,
        )
