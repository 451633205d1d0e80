"""``clip_train``: train an open_clip model from scratch on a shard dataset.

The model is any open_clip architecture (``mmflow-clip-tiny`` by default, or
a custom config given inline), trained with open_clip's contrastive loss
(``open_clip.loss.ClipLoss``, features gathered across ranks) through the
shared harness (:mod:`mmflow.train`): DDP on Ray Train, any number of workers.

Data: each rank streams its own shards (or every ``world``-th sample when
there are fewer shards than ranks) through the model's own preprocessing (the
train transform with ``augment``) and a shuffle buffer; when its share fits
``cache_mb`` it is kept in memory after the first epoch, shuffled afresh each
epoch. A deterministic slice of keys (by hash) is held out:
rank 0 reports image->text and text->image recall@1/@5 on it, and, when the
data carries ground truth (``mismatched`` in the sample json), how well the
score separates clean from mismatched held-out pairs (``roc_auc``). Held-out
recall counts only clean pairs, since a mismatched caption has no right answer.

The default schedule is short on purpose: the model later scores the very
pairs it trained on, and with many more epochs it starts to memorise the
mismatched ones (their scores rise towards the clean ones').

The output is a folder open_clip loads directly (see :func:`mmflow.models.clip.save_clip`);
it is also logged to the stage's MLflow run as the ``model`` artifact.
"""

from __future__ import annotations

import io
import math
import os
import random
import tempfile
from collections.abc import Iterator
from typing import Any

from pydantic import Field, model_validator

from mmflow.data.holdout import is_held_out
from mmflow.data.shards import list_shards
from mmflow.data.webdataset_io import iter_shard
from mmflow.models.clip import model_config, register_config, save_clip
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.storage import Storage
from mmflow.train import TrainConfig, TrainTask, fit
from mmflow.train.epochs import Epochs, batches


class ClipTrainConfig(TrainConfig):
    """The harness's config with defaults that train ``mmflow-clip-tiny`` on the quickstart in about a minute."""

    max_steps: int = Field(
        150, ge=1, description="optimizer steps (longer memorises the noisy pairs)"
    )
    batch_size: int = Field(
        256, ge=2, description="micro batch per worker (contrastive: bigger is better)"
    )
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(30, ge=0)
    checkpoint_every: int = Field(100, ge=0)
    log_every: int = Field(10, ge=1)


class ClipTrainParams(Params):
    arch: str = Field(
        "mmflow-clip-tiny", description="open_clip architecture (or the name for model_cfg)"
    )
    model_cfg: dict[str, Any] | None = Field(
        None,
        description="custom open_clip config (embed_dim, vision_cfg, text_cfg), registered as `arch`",
    )
    train: ClipTrainConfig = Field(default_factory=ClipTrainConfig)
    holdout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="share of keys held out for eval"
    )
    eval_samples: int = Field(
        1000, ge=0, description="held-out pairs evaluated (0 = no retrieval eval)"
    )
    shuffle_buffer: int = Field(2048, ge=1, description="samples shuffled together while streaming")
    augment: bool = Field(
        False,
        description="open_clip's train transform (random resized crop); off: "
        "at 32 px a crop shifts shapes against the captions' position words",
    )
    cache_mb: int = Field(
        1024,
        ge=0,
        description="per worker: keep preprocessed samples in memory "
        "when they fit, instead of decoding every epoch (not with augment)",
    )

    @model_validator(mode="after")
    def _check(self) -> ClipTrainParams:
        if self.model_cfg is not None and not all(
            k in self.model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
        ):
            raise ValueError(
                "model_cfg needs embed_dim, vision_cfg and text_cfg (an open_clip model config)"
            )
        return self


def _example_bytes(example) -> int:
    image, tokens = example
    return image.numel() * image.element_size() + tokens.numel() * tokens.element_size()


class ClipTask(TrainTask):
    """Model, data, loss and eval for the harness. Pickled to each worker; caches live per process."""

    def __init__(
        self, shards: list[str], p: ClipTrainParams, model_cfg: dict[str, Any], threads: int
    ):
        self.shards, self.p, self.model_cfg, self.threads = shards, p, model_cfg, threads
        self._loss_fn = self._heldout = self._transforms = self._epochs = None

    # --- model --------------------------------------------------------------------------------
    def build_model(self):
        import open_clip
        import torch

        from mmflow.models.clip import quiet

        torch.set_num_threads(self.threads)
        register_config(self.p.arch, self.model_cfg)
        with quiet():
            return open_clip.create_model(self.p.arch, output_dict=True)

    def save(self, model, out_dir: str) -> None:
        save_clip(model, self.p.arch, self.model_cfg, out_dir, source="clip_train")

    # --- data ---------------------------------------------------------------------------------
    def _load_transforms(self):
        if self._transforms is None:
            from mmflow.models.clip import ClipSource, load_transforms

            register_config(self.p.arch, self.model_cfg)
            train, tokenizer = load_transforms(
                ClipSource(self.p.arch, None, self.p.arch, ""), train=True
            )
            val, _ = load_transforms(ClipSource(self.p.arch, None, self.p.arch, ""), train=False)
            self._transforms = train, val, tokenizer
        return self._transforms

    def _samples(self, rank: int, world: int, rng: random.Random) -> Iterator[tuple[bytes, str]]:
        """One pass over this rank's training samples, shards in a shuffled order: (image bytes, caption)."""
        storage = Storage()
        by_shard = len(self.shards) >= world
        mine = self.shards[rank::world] if by_shard else list(self.shards)
        for uri in rng.sample(mine, len(mine)):
            for s in iter_shard(storage, uri):
                if (
                    s.error
                    or not (s.caption or "").strip()
                    or is_held_out(s.key, self.p.holdout_fraction)
                ):
                    continue
                if not by_shard and s.index % world != rank:
                    continue
                yield s.image, s.caption

    def _examples(self, rank: int, world: int, rng: random.Random) -> Iterator[tuple[Any, Any]]:
        """One epoch of this rank's (image tensor, tokens), streamed from the shards through a
        shuffle buffer; without augmentation, replayed from memory when the rank's share fits
        ``cache_mb`` (:class:`mmflow.train.epochs.Epochs`)."""
        if self._epochs is None:
            cache = 0 if self.p.augment else self.p.cache_mb << 20
            self._epochs = Epochs(self.p.shuffle_buffer, cache, _example_bytes)
        return self._epochs.epoch(lambda: self._decoded(rank, world, rng), rng)

    def _decoded(self, rank: int, world: int, rng: random.Random) -> Iterator[tuple[Any, Any]]:
        from PIL import Image

        train_tf, val_tf, tokenizer = self._load_transforms()
        transform = train_tf if self.p.augment else val_tf
        for image, caption in self._samples(rank, world, rng):
            try:
                yield (
                    transform(Image.open(io.BytesIO(image)).convert("RGB")),
                    tokenizer([caption])[0],
                )
            except Exception:  # clip_filter counts bad images; training just skips them
                continue

    def train_batches(
        self, rank: int, world_size: int, start_step: int
    ) -> Iterator[dict[str, Any]]:
        import torch

        # a resume reshuffles, reproducibly
        rng = random.Random(f"{self.p.train.seed}-{rank}-{start_step}")
        empty = f"rank {rank}: no training samples in {len(self.shards)} shards"
        epoch = lambda: self._examples(rank, world_size, rng)  # noqa: E731
        for batch in batches(epoch, self.p.train.batch_size, empty):
            yield {
                "image": torch.stack([b[0] for b in batch]),
                "text": torch.stack([b[1] for b in batch]),
            }

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
        with (
            torch.no_grad()
        ):  # open_clip's trainer clamps after each step; before the next forward is the same
            getattr(model, "module", model).logit_scale.clamp_(0, math.log(100))
        out = model(image=batch["image"], text=batch["text"])
        loss = self._loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        return loss, {"logit_scale": float(out["logit_scale"].detach())}

    def _heldout_set(self):
        """Up to ``eval_samples`` held-out pairs (image tensor, tokens, mismatched or None), loaded once."""
        if self._heldout is None:
            import torch
            from PIL import Image

            _, val_tf, tokenizer = self._load_transforms()
            images, captions, truth = [], [], []
            for uri in self.shards:
                for s in iter_shard(Storage(), uri):
                    if len(images) >= self.p.eval_samples:
                        break
                    if (
                        s.error
                        or not (s.caption or "").strip()
                        or not is_held_out(s.key, self.p.holdout_fraction)
                    ):
                        continue
                    try:
                        images.append(val_tf(Image.open(io.BytesIO(s.image)).convert("RGB")))
                    except Exception:
                        continue
                    captions.append(s.caption)
                    truth.append(s.meta.get("mismatched"))
            self._heldout = (
                torch.stack(images) if images else None,
                tokenizer(captions) if captions else None,
                truth,
            )
        return self._heldout

    def evaluate(self, model) -> dict[str, float]:
        import numpy as np
        import torch

        from mmflow.eval.metrics import retrieval_recall, roc_auc

        images, texts, truth = self._heldout_set()
        out = {"logit_scale": float(model.logit_scale.exp())}
        if images is None:
            return out
        dev = next(model.parameters()).device
        img_f = torch.cat(
            [
                model.encode_image(images[i : i + 256].to(dev), normalize=True).float()
                for i in range(0, len(images), 256)
            ]
        )
        txt_f = torch.cat(
            [
                model.encode_text(texts[i : i + 256].to(dev), normalize=True).float()
                for i in range(0, len(texts), 256)
            ]
        )
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


@register
class ClipTrain(Stage):
    type = "clip_train"
    version = "1"
    description = (
        "Train an open_clip model (contrastive loss) on shards with the shared DDP harness."
    )
    Params = ClipTrainParams
    inputs = {"shards": "shards"}
    outputs = {"model": "model"}
    resources = Resources(cpus=2, workers=1)

    def run(self, ctx: StageContext) -> None:
        p: ClipTrainParams = ctx.params
        if p.model_cfg is not None:
            register_config(p.arch, p.model_cfg)
        cfg = p.model_cfg or model_config(p.arch)
        shards = list_shards(ctx.storage, ctx.inputs["shards"].uri)
        if not shards:
            raise ValueError(f"no .tar shards in {ctx.inputs['shards'].uri}")
        task = ClipTask(shards, p, cfg, threads=max(1, int(ctx.resources.cpus)))
        final = fit(task, p.train, ctx, model_output="model")
        # the harness logged the history; these last values go to the manifest (and `mmflow status`)
        ctx.log_metrics(
            {
                k.replace("train/", "final_").replace("eval/", "heldout_"): v
                for k, v in final.items()
                if k != "step"
            }
        )
        with tempfile.TemporaryDirectory(prefix="mmflow-clip-") as tmp:
            local = os.path.join(tmp, "model")  # a folder is logged under its own name
            ctx.storage.download_dir(ctx.outputs["model"], local)
            ctx.log_artifact(local)
        ctx.record_output(
            "model",
            arch=p.arch,
            format="open_clip",
            steps=int(final.get("step", 0)),
            load="open_clip.create_model_and_transforms('local-dir:<this folder>')",
        )
