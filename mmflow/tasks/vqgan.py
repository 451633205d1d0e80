"""The VQ-GAN's training task: generator and discriminator as one module with one loss
(:class:`mmflow.models.vqgan_losses.VQGANTraining`), so the harness's single optimizer serves
both; the optimizer step rides with each batch, since the GAN start and the dead-code
restarts follow a schedule.

Data (:mod:`mmflow.tasks.data`): each rank streams its share of the shards through the model's
preprocessing and a shuffle buffer, and keeps its share in memory as uint8 when it fits
``cache_mb``. Images PIL cannot decode are skipped and counted
(:meth:`VqganTask.data_counters`); captions are not needed.

Eval (rank 0): PSNR and SSIM of up to ``eval_samples`` held-out reconstructions, the share of
codes used and their perplexity, and a picture of ``preview`` originals above their
reconstructions in the stage's MLflow run.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mmflow.models.perceptual import build_perceptual
from mmflow.tasks.data import ShardData
from mmflow.tasks.evaluation import chunked
from mmflow.train.config import TrainConfig, TrainTask
from mmflow.train.epochs import batches

if TYPE_CHECKING:  # the model code imports torch
    from mmflow.models.vqgan import VQGANConfig
    from mmflow.models.vqgan_losses import VQGANLossConfig


class VqganTask(TrainTask):
    """Model, data, loss and eval for the harness. Pickled to each worker; caches live per process."""

    def __init__(
        self,
        data: ShardData,
        *,
        arch: str,
        model: VQGANConfig,
        loss: VQGANLossConfig,
        perceptual: dict[str, Any] | None,
        train: TrainConfig,
        preview: int = 16,
        threads: int = 1,
        tracking_uri: str = "",
        run_id: str | None = None,
    ):
        self.data, self.arch, self.cfg, self.loss_cfg = data, arch, model, loss
        self.perceptual, self.train, self.preview, self.threads = (
            perceptual,
            train,
            preview,
            threads,
        )
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._heldout = None
        self._step: int | None = None  # optimizer steps done, as seen by loss()

    # --- model --------------------------------------------------------------------------------
    def build_model(self):
        import torch

        from mmflow.models.vqgan import VQGAN
        from mmflow.models.vqgan_losses import VQGANTraining

        torch.set_num_threads(self.threads)
        net = build_perceptual(self.perceptual)
        return VQGANTraining(VQGAN(self.cfg), self.loss_cfg, net)

    def save(self, model, out_dir: str) -> None:
        from mmflow.models.vqgan import save_vqgan

        save_vqgan(model.vqgan, out_dir, self.arch, source="vqgan_train", steps=self._steps_done())

    def _steps_done(self) -> int:
        return self._step if self._step is not None else self.train.max_steps

    # --- data ---------------------------------------------------------------------------------
    def _prepare(self):
        """(sample, RGB image) -> uint8 (3, S, S): the model's preprocessing, kept small."""
        from mmflow.models.vqgan import Preprocess

        pre = Preprocess(self.cfg.image_size)
        return lambda s, image: pre.pixels(image)

    def _epoch(self, rank: int, world: int, rng: random.Random) -> Iterator[Any]:
        """One epoch of this rank's training images (uint8)."""
        return self.data.epoch(rank, world, rng, self._prepare(), size=lambda t: t.numel())

    def train_batches(
        self, rank: int, world_size: int, start_step: int
    ) -> Iterator[dict[str, Any]]:
        import torch

        from mmflow.models.vqgan import from_uint8

        rng = random.Random(f"{self.train.seed}-{rank}-{start_step}")  # a resume reshuffles
        micro, per_step = start_step * self.train.grad_accum, self.train.grad_accum
        empty = f"rank {rank}: no training images in {len(self.data.shards)} shards"
        epoch = lambda: self._epoch(rank, world_size, rng)  # noqa: E731
        for batch in batches(epoch, self.train.batch_size, empty):
            # the step travels with the batch: the GAN and the restarts follow a schedule
            yield {"image": from_uint8(torch.stack(batch)), "step": micro // per_step}
            micro += 1

    def data_counters(self) -> dict[str, int]:
        return self.data.counters()

    # --- loss and eval ----------------------------------------------------------------------------
    def loss(self, model, batch):
        self._step = batch["step"] + 1
        return model(batch["image"], batch["step"])

    def heldout_set(self):
        """Up to ``eval_samples`` held-out images, uint8 (N, 3, S, S), loaded once; None if none."""
        if self._heldout is None:
            import torch

            images = self.data.heldout(self._prepare())
            self._heldout = torch.stack(images) if images else None
        return self._heldout

    def evaluate(self, model) -> dict[str, float]:
        import torch

        from mmflow.eval.metrics import perplexity, psnr, ssim
        from mmflow.models.vqgan import from_uint8, to_unit

        images = self.heldout_set() if self.data.eval_samples > 0 else None
        if images is None:
            return {}
        vq, previews = model.vqgan, []
        dev = next(vq.parameters()).device

        def reconstruct(pixels):  # uint8 (B, 3, S, S) -> PSNR (B,), SSIM (B,), tokens (B*h*w,)
            x = from_uint8(pixels)
            xrec, _, tokens, _ = vq(x)
            if not previews:  # the first chunk's first images, for the picture
                previews.append((x[: self.preview].cpu(), xrec[: self.preview].cpu()))
            orig, rec = to_unit(x), to_unit(xrec)
            return psnr(rec, orig).cpu(), ssim(rec, orig).cpu(), tokens.flatten().cpu()

        psnrs, ssims, tokens = chunked(reconstruct, images, dev)
        self._log_grid(*previews[0])
        counts = torch.bincount(tokens, minlength=vq.cfg.codebook_size)
        return {
            "psnr": float(psnrs.mean()),
            "ssim": float(ssims.mean()),
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
            step = self._steps_done()
            log_image(self.tracking_uri, self.run_id, sheet, f"reconstructions/step_{step:06d}")
        except Exception as e:  # a flaky tracking server must not kill a long run
            sys.stdout.write(f"[vqgan_train] warning: could not log the reconstruction grid: {e}\n")
