"""``vqgan_train``: train a VQ-GAN image tokenizer on a shard dataset.

The model is a named architecture (``vqgan-tiny-f4`` by default; see
``mmflow/models/configs/vqgan-*.json``) with optional field overrides in
``model_cfg``. It trains through the shared harness (:mod:`mmflow.train`): DDP on
Ray Train, any number of workers, checkpoints and resume. Generator and
discriminator are one module with one loss (see :mod:`mmflow.models.vqgan_losses`),
so the harness's single optimizer serves both.

The perceptual loss's feature network is ``loss.perceptual.kind``: ``auto`` (the
default) uses the CLIP image tower wired as the optional ``clip`` input (e.g.
``clip_train``'s model) and nothing otherwise; ``clip`` can also name a CLIP in
``loss.perceptual.clip``; ``lpips`` reads VGG16 (and LPIPS) weights from local
files; ``none`` turns it off.

Data: each rank streams its own shards (or every ``world``-th sample when there are
fewer shards than ranks) through the model's preprocessing and a shuffle buffer,
and keeps its share in memory as uint8 when it fits ``cache_mb``. A deterministic
slice of keys (by hash, as in ``clip_train``) is held out: at each evaluation rank 0
logs ``psnr`` (dB, against the decoded input in [0, 1]), ``ssim``,
``codebook_usage`` (the fraction of codes the held-out images use) and
``perplexity``, and a picture of originals above their reconstructions. The final
values become the stage's ``val_*`` metrics (manifest and ``mmflow status``).

The output ``model`` is a folder :func:`mmflow.models.vqgan.load_vqgan` reads; the
driver also logs it to the stage's MLflow run as a pytorch model and registers it in the
model registry (``registered_model_name``; :mod:`mmflow.models.vqgan_mlflow`).
"""

from __future__ import annotations

import io
import random
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from mmflow.data.holdout import is_held_out
from mmflow.data.shards import list_shards
from mmflow.data.webdataset_io import iter_shard
from mmflow.models.perceptual import PerceptualSpec, build_perceptual, perceptual_plan
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.storage import Storage
from mmflow.train import TrainConfig, TrainTask, fit
from mmflow.train.epochs import Epochs, batches
from mmflow.train.harness import absolute_tracking_uri

if TYPE_CHECKING:  # the model code imports torch; this module stays light for config loading
    from mmflow.models.vqgan import VQGANConfig
    from mmflow.models.vqgan_losses import VQGANLossConfig


class VqganTrainConfig(TrainConfig):
    """The harness's config with defaults that train ``vqgan-tiny-f4`` on the quickstart in about
    four minutes on two CPUs (small batches: more updates for the same compute)."""

    max_steps: int = Field(1200, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="micro batch per worker")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    checkpoint_every: int = Field(400, ge=0)
    eval_every: int = Field(400, ge=0)
    log_every: int = Field(25, ge=1)


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
        from mmflow.models.vqgan import vqgan_config

        return vqgan_config(self.arch, self.model_cfg)


class VqganTask(TrainTask):
    """Model, data, loss and eval for the harness. Pickled to each worker; caches live per process."""

    def __init__(
        self,
        shards: list[str],
        p: VqganTrainParams,
        perceptual: dict[str, Any] | None,
        threads: int,
        tracking_uri: str,
        run_id: str | None,
    ):
        self.shards, self.p, self.cfg, self.perceptual = shards, p, p.model_config_(), perceptual
        self.threads, self.tracking_uri, self.run_id = threads, tracking_uri, run_id
        self._epochs = self._heldout = None
        self._step: int | None = None  # optimizer steps done, as seen by loss()

    # --- model --------------------------------------------------------------------------------
    def build_model(self):
        import torch

        from mmflow.models.vqgan import VQGAN
        from mmflow.models.vqgan_losses import VQGANTraining

        torch.set_num_threads(self.threads)
        net = build_perceptual(self.perceptual)
        loss = self.p.loss.build(self.p.train.max_steps)
        return VQGANTraining(VQGAN(self.cfg), loss, net)

    def save(self, model, out_dir: str) -> None:
        from mmflow.models.vqgan import save_vqgan

        save_vqgan(
            model.vqgan, out_dir, self.p.arch, source="vqgan_train", steps=self._steps_done()
        )

    def _steps_done(self) -> int:
        return self._step if self._step is not None else self.p.train.max_steps

    # --- data ---------------------------------------------------------------------------------
    def _decoded(self, uris: list[str], held_out: bool, rank: int = 0, world: int = 1):
        """(key, uint8 image (3, S, S)) of the training or the held-out samples; bad images are
        skipped (clip_filter and pretokenize count them)."""
        from PIL import Image

        from mmflow.models.vqgan import Preprocess

        pre, storage = Preprocess(self.cfg.image_size), Storage()
        by_shard = len(self.shards) >= world
        for uri in uris:
            for s in iter_shard(storage, uri):
                if s.error or is_held_out(s.key, self.p.holdout_fraction) != held_out:
                    continue
                if not by_shard and s.index % world != rank:
                    continue
                try:
                    with Image.open(io.BytesIO(s.image)) as img:
                        yield s.key, pre.pixels(img)
                except Exception:
                    continue

    def _epoch(self, rank: int, world: int, rng: random.Random) -> Iterator[Any]:
        """One pass over this rank's training images (uint8), shards in a shuffled order, through a
        shuffle buffer; replayed from memory in a fresh order once it was seen whole and fits."""
        if self._epochs is None:
            self._epochs = Epochs(self.p.shuffle_buffer, self.p.cache_mb << 20, lambda t: t.numel())
        mine = self.shards[rank::world] if len(self.shards) >= world else list(self.shards)

        def stream():
            order = rng.sample(mine, len(mine))
            return (px for _, px in self._decoded(order, False, rank, world))

        return self._epochs.epoch(stream, rng)

    def train_batches(
        self, rank: int, world_size: int, start_step: int
    ) -> Iterator[dict[str, Any]]:
        import torch

        from mmflow.models.vqgan import from_uint8

        rng = random.Random(f"{self.p.train.seed}-{rank}-{start_step}")  # a resume reshuffles
        micro, per_step = start_step * self.p.train.grad_accum, self.p.train.grad_accum
        empty = f"rank {rank}: no training images in {len(self.shards)} shards"
        epoch = lambda: self._epoch(rank, world_size, rng)  # noqa: E731
        for batch in batches(epoch, self.p.train.batch_size, empty):
            # the step travels with the batch: the GAN and the restarts follow a schedule
            yield {"image": from_uint8(torch.stack(batch)), "step": micro // per_step}
            micro += 1

    # --- loss and eval ----------------------------------------------------------------------------
    def loss(self, model, batch):
        self._step = batch["step"] + 1
        return model(batch["image"], batch["step"])

    def _heldout_set(self):
        """Up to ``eval_samples`` held-out images, uint8 (N, 3, S, S), loaded once."""
        if self._heldout is None:
            import torch

            images = []
            for _, pixels in self._decoded(self.shards, True):
                if len(images) >= self.p.eval_samples:
                    break
                images.append(pixels)
            self._heldout = torch.stack(images) if images else None
        return self._heldout

    def evaluate(self, model) -> dict[str, float]:
        import torch

        from mmflow.eval.metrics import perplexity, psnr, ssim
        from mmflow.models.vqgan import from_uint8, to_unit

        images = self._heldout_set() if self.p.eval_samples > 0 else None
        if images is None:
            return {}
        vq = model.vqgan
        dev = next(vq.parameters()).device
        K = vq.cfg.codebook_size
        counts, scores = torch.zeros(K, dtype=torch.long), {"psnr": [], "ssim": []}
        for i in range(0, len(images), 256):
            x = from_uint8(images[i : i + 256]).to(dev)
            xrec, _, tokens, _ = vq(x)
            counts += torch.bincount(tokens.flatten().cpu(), minlength=K)
            orig, rec = to_unit(x), to_unit(xrec)
            scores["psnr"].append(psnr(rec, orig).cpu())
            scores["ssim"].append(ssim(rec, orig).cpu())
            if i == 0:
                self._log_grid(x[: self.p.preview].cpu(), xrec[: self.p.preview].cpu())
        return {
            "psnr": float(torch.cat(scores["psnr"]).mean()),
            "ssim": float(torch.cat(scores["ssim"]).mean()),
            "codebook_usage": float((counts > 0).float().mean()),
            "perplexity": perplexity(counts),
            "num_samples": float(len(images)),
        }

    def _log_grid(self, originals, reconstructions) -> None:
        """Originals above their reconstructions (model space), 8 a row, into the stage's run
        (rank 0 only)."""
        if not self.run_id or len(originals) == 0:
            return
        from PIL import Image

        from mmflow.data.images import contact_sheet
        from mmflow.models.vqgan import to_pil
        from mmflow.tracking import log_image

        cols, pics = min(8, len(originals)), []
        blank = Image.new("RGB", to_pil(originals[0]).size, "white")
        for i in range(0, len(originals), cols):
            for batch in (originals[i : i + cols], reconstructions[i : i + cols]):
                pics += [to_pil(t) for t in batch] + [blank] * (cols - len(batch))
        try:
            sheet = contact_sheet(pics, cols=cols, cell=64)
            log_image(
                self.tracking_uri,
                self.run_id,
                sheet,
                f"reconstructions/step_{self._steps_done():06d}",
            )
        except Exception as e:  # a flaky tracking server must not kill a long run
            sys.stdout.write(f"[vqgan_train] warning: could not log the reconstruction grid: {e}\n")


# --- the stage -----------------------------------------------------------------------------------


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

    def run(self, ctx: StageContext) -> None:
        from mmflow.models.vqgan import describe
        from mmflow.models.vqgan_mlflow import log_and_register

        p: VqganTrainParams = ctx.params
        cfg = p.model_config_()
        shards = list_shards(ctx.storage, ctx.inputs["shards"].uri)
        if not shards:
            raise ValueError(f"no .tar shards in {ctx.inputs['shards'].uri}")
        plan = perceptual_plan(p.loss.perceptual, ctx)
        print(f"[{ctx.stage}] {p.arch}: {describe(cfg)}; perceptual {plan['kind'] if plan else 'none'}; "
              f"{len(shards)} shards, {ctx.resources.workers} worker(s)", flush=True)  # fmt: skip
        task = VqganTask(
            shards,
            p,
            plan,
            threads=max(1, int(ctx.resources.cpus)),
            tracking_uri=absolute_tracking_uri(ctx.tracking_uri),
            run_id=ctx.run_id,
        )
        final = fit(task, p.train, ctx, model_output="model")
        renamed = {"train/loss": "final_loss", "eval/num_samples": "val_num_samples"}
        ctx.log_metrics(
            {
                renamed.get(k, k.replace("eval/", "val_")): v
                for k, v in final.items()
                if k.startswith("eval/") or k in renamed
            }
        )
        name = p.registered_model_name
        name = f"{ctx.pipeline}-{ctx.stage}" if name is None else name
        registered = log_and_register(ctx, ctx.outputs["model"], name or None)
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
        print(
            f"[{ctx.stage}] trained {int(final.get('step', 0))} steps; held-out {summary}",
            flush=True,
        )
