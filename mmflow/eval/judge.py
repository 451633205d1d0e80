"""An attribute judge for synthetic pictures: a small CNN that reads the colour and shape of
the one object in a ``synth_shapes`` picture and its background, so that generated pictures
can be scored against the prompt that asked for them (``mmflow.eval.joint``).

It is trained on the real pictures' ground truth (the ``synth`` scene in each sample's json)
with augmentation that imitates VQ-GAN reconstructions (blur, noise, small colour shifts), so
it judges decoded pictures as fairly as real ones. Label ids are positions in the vocabulary
tables of ``mmflow.data.shapes_vocab``; the saved weights carry that vocabulary and loading
refuses a judge trained on another.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmflow.data.shapes_vocab import BACKGROUNDS, COLORS, SHAPES

ATTRIBUTES = ("color", "shape", "background")
VOCAB = {"color": tuple(COLORS), "shape": tuple(SHAPES), "background": tuple(BACKGROUNDS)}


def scene_labels(scenes: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Label ids of one-object scenes: ``{"color", "shape", "background"}`` -> (N,) long."""
    out: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}
    for i, scene in enumerate(scenes):
        if len(scene["objects"]) != 1:
            raise ValueError(
                f"scene {i} has {len(scene['objects'])} objects; the judge reads one-object scenes"
            )
        obj = scene["objects"][0]
        out["color"].append(VOCAB["color"].index(obj["color"]))
        out["shape"].append(VOCAB["shape"].index(obj["shape"]))
        out["background"].append(VOCAB["background"].index(scene["background"]))
    return {a: torch.tensor(v, dtype=torch.long) for a, v in out.items()}


def label_names(labels: dict[str, torch.Tensor]) -> list[dict[str, str]]:
    """Label ids (or predictions) back to words, one dict per picture."""
    n = len(labels[ATTRIBUTES[0]])
    return [{a: VOCAB[a][int(labels[a][i])] for a in ATTRIBUTES} for i in range(n)]


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) pictures -> float in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0.0, 1.0)


class AttributeJudge(nn.Module):
    """(B, 3, S, S) pictures in [0, 1] -> logits per attribute.

    Four conv blocks and three 2x poolings bring 32 px down to 4 px; average and max pooling
    over what is left keep it indifferent to where the object sits (positions vary), and the
    max still sees a small object on a large background.
    """

    def __init__(self, image_size: int = 32, width: int = 32):
        super().__init__()
        self.image_size = image_size
        self.width = width
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(3, w // 2),  # (B, w/2, S, S)
            nn.MaxPool2d(2),  # (B, w/2, S/2, S/2)
            block(w // 2, w),
            nn.MaxPool2d(2),  # (B, w, S/4, S/4)
            block(w, 2 * w),
            nn.MaxPool2d(2),  # (B, 2w, S/8, S/8)
            block(2 * w, 2 * w),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(VOCAB[a])) for a in ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x - 0.5)  # (B, 2w, S/8, S/8)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # (B, 4w)
        return {a: head(pooled) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 512) -> dict[str, torch.Tensor]:
        """Judged label ids of (N, 3, S, S) pictures, uint8 or float in [0, 1] -> (N,) long each.

        Pictures of another size are resized to the judge's (antialiased) first.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
        for start in range(0, len(images), batch):
            x = _as_float(images[start : start + batch]).to(device)
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
            for a, logits in self(x).items():
                out[a].append(logits.argmax(1).cpu())
        self.train(was_training)
        if not len(images):
            return {a: torch.zeros(0, dtype=torch.long) for a in ATTRIBUTES}
        return {a: torch.cat(v) for a, v in out.items()}

    def save(self, f: str | IO[bytes]) -> None:
        """Weights, architecture and vocabulary as plain tensors and lists (``weights_only`` loads)."""
        torch.save(
            {
                "state_dict": self.state_dict(),
                "config": {"image_size": self.image_size, "width": self.width},
                "vocab": {a: list(v) for a, v in VOCAB.items()},
            },
            f,
        )

    @classmethod
    def load(cls, f: str | IO[bytes], map_location: str | torch.device = "cpu") -> AttributeJudge:
        blob = torch.load(f, map_location=map_location, weights_only=True)
        vocab = {a: tuple(v) for a, v in blob["vocab"].items()}
        if vocab != VOCAB:
            raise ValueError(f"judge was trained on vocabulary {vocab}, this code has {VOCAB}")
        judge = cls(**blob["config"])
        judge.load_state_dict(blob["state_dict"])
        return judge.eval()


class _Augmenter:
    """Light, label-preserving changes a VQ-GAN reconstruction may show.

    Per picture: a blur of random strength (a blend towards a 3x3 binomial blur, or towards
    a 2x or 4x down-and-up sampling, which smears edges like a decoder working from a coarse
    code grid), a small per-channel colour shift, Gaussian noise, a shift of up to 2 px and
    a left-right flip. No vertical flip: it would turn the triangle upside down, which the
    data never shows. The blurred copies and the padding for the shift are made once for
    the whole set, so a step only indexes and blends (per-batch CPU convolutions would cost
    more than the judge itself).
    """

    pad = 2

    def __init__(self, x: torch.Tensor):  # (N, 3, S, S) in [0, 1]
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        rows = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
        binomial = (rows[..., :-2] + 2 * rows[..., 1:-1] + rows[..., 2:]) / 16
        coarse = [
            F.interpolate(F.avg_pool2d(x, f), size=x.shape[-2:], mode="bilinear") for f in (2, 4)
        ]
        k = self.pad
        self.size = x.shape[-1]
        self.views = [F.pad(v, (k, k, k, k), mode="replicate") for v in (x, binomial, *coarse)]

    def __call__(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, s, k = len(idx), self.size, self.pad

        def u(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=gen)

        dy, dx = (int(v) for v in torch.randint(0, 2 * k + 1, (2,), generator=gen))
        sharp, *blurs = (v[idx, :, dy : dy + s, dx : dx + s] for v in self.views)
        which = torch.randint(0, len(blurs), (b, 1, 1, 1), generator=gen)
        blurred = blurs[0]
        for i, view in enumerate(blurs[1:], start=1):
            blurred = torch.where(which == i, view, blurred)
        x = torch.lerp(sharp, blurred, u(b, 1, 1, 1))
        x = x + (u(b, 3, 1, 1) - 0.5) * 0.08  # colour shift of up to +-0.04 per channel
        x = x + torch.randn(x.shape, generator=gen) * (u(b, 1, 1, 1) * 0.05)
        flip = u(b) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.clamp_(0.0, 1.0)


def train_judge(
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    steps: int = 300,
    batch: int = 64,
    seed: int = 0,
    threads: int | None = None,
    lr: float = 3e-3,
    width: int = 32,
) -> AttributeJudge:
    """Train a judge on (N, 3, S, S) pictures (uint8, or float in [0, 1]) and their label ids.

    AdamW with a one-cycle schedule. ``threads`` sets torch's CPU threads for the training
    only (None: leave them); on a CPU shared with other busy processes use 1, as a second
    thread spends its time waiting for the first. The returned judge is in eval mode and
    carries ``train_seconds``.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (N, 3, S, S), got {tuple(images.shape)}")
    for a in ATTRIBUTES:
        if a not in labels or len(labels[a]) != len(images):
            raise ValueError(f"labels[{a!r}] must hold one id per picture ({len(images)})")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        torch.manual_seed(seed)  # the initial weights
        gen = torch.Generator().manual_seed(seed)  # batches and augmentation
        judge = AttributeJudge(image_size=images.shape[-1], width=width)
        augment = _Augmenter(_as_float(images))
        y_all = {a: labels[a].long() for a in ATTRIBUTES}
        opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        judge.train()
        for _ in range(steps):
            idx = torch.randint(0, len(images), (min(batch, len(images)),), generator=gen)
            logits = judge(augment(idx, gen))
            loss = sum(F.cross_entropy(logits[a], y_all[a][idx]) for a in ATTRIBUTES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        judge.train_seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)
    return judge.eval()


def accuracy(
    judge: AttributeJudge, images: torch.Tensor, labels: dict[str, torch.Tensor]
) -> dict[str, float]:
    """``judge_acc`` (all three attributes right) and ``judge_acc_<attribute>`` on labelled pictures."""
    pred = judge.predict(images)
    right = {a: pred[a] == labels[a].long() for a in ATTRIBUTES}
    n = len(images)
    if n == 0:
        return {"judge_acc": float("nan"), **{f"judge_acc_{a}": float("nan") for a in ATTRIBUTES}}
    all_right = right["color"] & right["shape"] & right["background"]
    return {
        "judge_acc": float(all_right.float().mean()),
        **{f"judge_acc_{a}": float(right[a].float().mean()) for a in ATTRIBUTES},
    }
