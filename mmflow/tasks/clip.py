"""CLIP's training task: an open_clip model from scratch, open_clip's contrastive loss
(``open_clip.loss.ClipLoss``, features gathered across ranks), and retrieval on held-out pairs.

Data (:mod:`mmflow.tasks.data`): each rank streams its share of the shards through the model's
own preprocessing (the train transform with ``augment``) and a shuffle buffer; when the share
fits ``cache_mb`` it is kept in memory after the first epoch, shuffled afresh each epoch
(:class:`mmflow.train.epochs.Epochs`). Samples without a caption or with an image PIL cannot
decode are skipped and counted (:meth:`ClipTask.data_counters`).

Eval (rank 0): image->text and text->image recall@1/@5 on up to ``eval_samples`` held-out pairs
and, when the data carries ground truth (``mismatched`` in the sample json), how well the score
separates clean from mismatched pairs (``roc_auc``). Recall counts only clean pairs, since a
mismatched caption has no right answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

from mmflow.models.clip import register_config, save_clip
from mmflow.tasks.data import ShardData
from mmflow.tasks.evaluation import chunked
from mmflow.train.config import TrainConfig, TrainTask
from mmflow.train.epochs import batches


def _example_bytes(example) -> int:
    image, tokens = example
    return image.numel() * image.element_size() + tokens.numel() * tokens.element_size()


class ClipTask(TrainTask):
    """Model, data, loss and eval for the harness. Pickled to each worker; caches live per process."""

    def __init__(
        self,
        data: ShardData,
        *,
        arch: str,
        model_cfg: dict[str, Any],
        train: TrainConfig,
        augment: bool = False,
        threads: int = 1,
    ):
        self.data, self.arch, self.model_cfg, self.train = data, arch, model_cfg, train
        self.augment, self.threads = augment, threads
        self._loss_fn = self._heldout = self._transforms = None

    # --- model --------------------------------------------------------------------------------
    def build_model(self):
        import open_clip
        import torch

        from mmflow.models.clip import quiet

        torch.set_num_threads(self.threads)
        register_config(self.arch, self.model_cfg)
        with quiet():
            return open_clip.create_model(self.arch, output_dict=True)

    def save(self, model, out_dir: str) -> None:
        save_clip(model, self.arch, self.model_cfg, out_dir, source="clip_train")

    # --- data ---------------------------------------------------------------------------------
    def _load_transforms(self):
        if self._transforms is None:
            from mmflow.models.clip import ClipSource, load_transforms

            register_config(self.arch, self.model_cfg)
            source = ClipSource(self.arch, None, self.arch, "")
            train, tokenizer = load_transforms(source, train=True)
            val, _ = load_transforms(source, train=False)
            self._transforms = train, val, tokenizer
        return self._transforms

    def _epoch(self, rank: int, world: int, rng: random.Random) -> Iterator[tuple[Any, Any]]:
        """One epoch of (image tensor, tokens); with augmentation never replayed from memory
        (each epoch draws new crops)."""
        train_tf, val_tf, tokenizer = self._load_transforms()
        transform = train_tf if self.augment else val_tf
        return self.data.epoch(
            rank,
            world,
            rng,
            prepare=lambda s, image: (transform(image), tokenizer([s.caption])[0]),
            size=_example_bytes,
            cache=not self.augment,
            require_caption=True,
        )

    def train_batches(
        self, rank: int, world_size: int, start_step: int
    ) -> Iterator[dict[str, Any]]:
        import torch

        # a resume reshuffles, reproducibly
        rng = random.Random(f"{self.train.seed}-{rank}-{start_step}")
        empty = f"rank {rank}: no training samples in {len(self.data.shards)} shards"
        epoch = lambda: self._epoch(rank, world_size, rng)  # noqa: E731
        for batch in batches(epoch, self.train.batch_size, empty):
            yield {
                "image": torch.stack([b[0] for b in batch]),
                "text": torch.stack([b[1] for b in batch]),
            }

    def data_counters(self) -> dict[str, int]:
        return self.data.counters()

    # --- loss and eval ----------------------------------------------------------------------------
    def loss(self, model, batch):
        import torch
        import torch.distributed as dist
        from open_clip.loss import ClipLoss

        if self._loss_fn is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            self._loss_fn = ClipLoss(
                local_loss=True,
                gather_with_grad=True,
                cache_labels=True,
                rank=rank,
                world_size=world,
            )
        # open_clip's trainer clamps after each step; before the next forward is the same
        with torch.no_grad():
            getattr(model, "module", model).logit_scale.clamp_(0, math.log(100))
        out = model(image=batch["image"], text=batch["text"])
        loss = self._loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        return loss, {"logit_scale": float(out["logit_scale"].detach())}

    def heldout_set(self):
        """(images (N, 3, S, S), tokens (N, T), mismatched or None per pair), loaded once;
        (None, None, []) without held-out pairs."""
        if self._heldout is None:
            import torch

            _, val_tf, tokenizer = self._load_transforms()
            pairs = self.data.heldout(
                lambda s, image: (val_tf(image), s.caption, s.meta.get("mismatched")),
                require_caption=True,
            )
            self._heldout = (
                torch.stack([p[0] for p in pairs]) if pairs else None,
                tokenizer([p[1] for p in pairs]) if pairs else None,
                [p[2] for p in pairs],
            )
        return self._heldout

    def evaluate(self, model) -> dict[str, float]:
        import numpy as np
        import torch

        from mmflow.eval.metrics import retrieval_recall, roc_auc

        images, texts, truth = self.heldout_set()
        out = {"logit_scale": float(model.logit_scale.exp())}
        if images is None:
            return out
        dev = next(model.parameters()).device
        img_f = chunked(lambda x: model.encode_image(x, normalize=True).float(), images, dev)
        txt_f = chunked(lambda t: model.encode_text(t, normalize=True).float(), texts, dev)
        has_truth = all(t is not None for t in truth)
        clean = (
            torch.tensor([not t for t in truth])
            if has_truth
            else torch.ones(len(truth), dtype=torch.bool)
        )
        out.update(retrieval_recall(img_f[clean], txt_f[clean], ks=(1, 5)))
        out["num_samples"] = float(clean.sum())
        if has_truth and 0 < clean.sum() < len(clean):
            scores = (img_f * txt_f).sum(-1).cpu().numpy()
            out["roc_auc"] = roc_auc(scores, np.asarray(clean))
        return out
