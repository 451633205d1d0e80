"""What trains a VQ-GAN: losses, the PatchGAN discriminator, perceptual networks, and
:class:`VQGANTraining`, the one module the shared harness trains.

The harness has one optimizer and one backward per step, so generator and
discriminator live in one module and one loss gives each its own gradients:

- the discriminator's hinge loss sees the reconstructions *detached*: it reaches
  only the discriminator;
- the generator's adversarial loss calls the discriminator functionally with
  *detached parameters*: it reaches only the generator;
- their balance is taming's adaptive weight, the ratio of the gradient norms of the
  reconstruction loss and of the adversarial loss at the decoder's last layer, from
  ``torch.autograd.grad`` (which fills no ``.grad`` and fires no DDP hook).

Before ``disc_start`` the discriminator is not run; its parameters join the loss
times zero, because DDP wants a gradient for every trainable parameter each step.

The perceptual network is frozen and loaded from its own files, so it is kept out of
the module's parameters (no optimizer state, no DDP sync, no checkpoint bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmflow.models.vqgan import VQGAN, to_unit


@dataclass(frozen=True, kw_only=True)
class VQGANLossConfig:
    pixel: str = "l1"  # reconstruction distance: l1 or l2
    pixel_weight: float = 1.0
    codebook_weight: float = 1.0  # codebook + commitment loss
    perceptual_weight: float = 0.1  # used when a perceptual network is given
    disc_weight: float = 0.1  # adversarial weight; 0 = no GAN
    disc_start: int = 900  # step at which the discriminator starts
    disc_layers: int = 2  # PatchGAN stride-2 layers
    disc_channels: int = 64
    adaptive_weight: bool = True  # balance by gradient norms at the decoder's last layer
    restart_every: int = 25  # dead-code restart period in steps; 0 = off
    restart_until: int | None = None  # last step with restarts; None = always

    def __post_init__(self) -> None:
        if self.pixel not in ("l1", "l2"):
            raise ValueError(f"pixel loss must be l1 or l2, not {self.pixel!r}")
        weights = (
            self.pixel_weight,
            self.codebook_weight,
            self.perceptual_weight,
            self.disc_weight,
        )
        if min(weights) < 0 or self.disc_start < 0 or self.restart_every < 0:
            raise ValueError("loss weights, disc_start and restart_every must be >= 0")
        if not 1 <= self.disc_layers <= 5 or self.disc_channels < 8:
            raise ValueError("disc_layers must be 1-5 and disc_channels >= 8")


# --- discriminator and GAN losses ---------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: one real/fake logit per overlapping patch. Group norm, not batch
    norm, so real and fake batches do not normalise each other."""

    def __init__(self, layers: int = 3, channels: int = 64):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for n in range(1, layers + 1):
            c_out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [
                nn.Conv2d(c, c_out, 4, stride, 1, bias=False),
                nn.GroupNorm(8, c_out),
                nn.LeakyReLU(0.2),
            ]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x):  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """taming's ||grad nll|| / ||grad g_loss|| at the decoder's last layer, clamped, no grad."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# --- perceptual networks --------------------------------------------------------------------------


def _feature_distance(a: list[torch.Tensor], b: list[torch.Tensor], dim: int, weights=None):
    """LPIPS's recipe: unit-normalise features along ``dim``, squared difference, (weighted)
    channel sum, mean over positions and batch, summed over layers."""
    total = 0.0
    for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
        d = (F.normalize(fa, dim=dim, eps=1e-10) - F.normalize(fb, dim=dim, eps=1e-10)) ** 2
        d = F.conv2d(d, weights[i]) if weights is not None else d.sum(dim, keepdim=True)
        total = total + d.mean()
    return total


class ClipPerceptual(nn.Module):
    """Distance between CLIP image-tower activations (each transformer block, or each ResNet
    stage), after CLIP's own input normalisation and resize."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        size = getattr(visual, "image_size", 224)
        self.size = tuple(size) if isinstance(size, tuple | list) else (size, size)
        if hasattr(visual, "transformer"):  # ViT: (B, L, D) per block, tokens along dim 1
            self.taps, self.dim = list(visual.transformer.resblocks), -1
        else:  # ModifiedResNet: (B, C, H, W) per stage
            self.taps, self.dim = [getattr(visual, f"layer{i}") for i in range(1, 5)], 1

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        hooks = [t.register_forward_hook(lambda m, i, o: out.append(o)) for t in self.taps]
        try:
            x = to_unit(x)
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(
                    x, size=self.size, mode="bilinear", antialias=True, align_corners=False
                )
            self.visual((x - self.mean) / self.std)
        finally:
            for h in hooks:
                h.remove()
        return out

    def forward(self, x, y):  # two (B, 3, H, W) in [-1, 1] -> scalar
        fx, fy = self.features(x), self.features(y)
        if self.dim == -1:
            fx, fy = (
                [f[..., None].transpose(1, -1) for f in fx],
                [f[..., None].transpose(1, -1) for f in fy],
            )
        return _feature_distance(fx, fy, dim=1)


VGG_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of vgg16.features


class LPIPS(nn.Module):
    """LPIPS (VGG16 variant) from local files: torchvision's VGG16 weights and, optionally,
    the lpips package's linear-layer weights (``vgg.pth``); without them, channels weigh 1."""

    def __init__(self, vgg_weights: str, lpips_weights: str | None = None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # vgg16's convolutional part only (its 120M-parameter classifier is never used)
        features = make_layers(cfgs["D"])[: VGG_TAPS[-1] + 1]
        state = torch.load(vgg_weights, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in state.items()}
        features.load_state_dict(
            {
                k: v
                for k, v in state.items()
                if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= VGG_TAPS[-1]
            }
        )
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.lins = None
        if lpips_weights:
            lin = torch.load(lpips_weights, map_location="cpu", weights_only=True)
            self.lins = [
                lin[f"lin{i}.model.1.weight"] for i in range(len(VGG_TAPS))
            ]  # (1, C, 1, 1)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG_TAPS:
                out.append(h)
        return out

    def forward(self, x, y):  # two (B, 3, H, W) in [-1, 1] -> scalar
        weights = [w.to(x.device, x.dtype) for w in self.lins] if self.lins is not None else None
        return _feature_distance(self._taps(x), self._taps(y), dim=1, weights=weights)


# --- the training module ----------------------------------------------------------------------------


class VQGANTraining(nn.Module):
    """Generator, discriminator and (hidden) perceptual network behind one ``forward`` that
    returns the step's whole loss and its parts."""

    def __init__(
        self,
        vqgan: VQGAN,
        cfg: VQGANLossConfig,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        self.vqgan, self.cfg = vqgan, cfg
        self.discriminator = PatchDiscriminator(cfg.disc_layers, cfg.disc_channels)
        self.__dict__["perceptual"] = perceptual  # not a submodule (see the module doc)

    def _perceptual(self, xrec, x) -> torch.Tensor:
        net = self.__dict__["perceptual"]
        if net is None or self.cfg.perceptual_weight == 0:
            return xrec.new_zeros(())
        if next(net.buffers(), x).device != x.device:
            net.to(x.device)
        return net(xrec, x)

    def forward(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        until = c.restart_until if c.restart_until is not None else step
        restart = c.restart_every > 0 and step % c.restart_every == 0 and step <= until
        xrec, vq_loss, tokens, _ = self.vqgan(x, restart=restart)
        pixel = F.l1_loss(xrec, x) if c.pixel == "l1" else F.mse_loss(xrec, x)
        perceptual = self._perceptual(xrec, x)
        nll = c.pixel_weight * pixel + c.perceptual_weight * perceptual
        loss = nll + c.codebook_weight * vq_loss
        out = {"pixel": pixel, "perceptual": perceptual, "vq": vq_loss}
        disc = self.discriminator
        if c.disc_weight > 0 and step >= c.disc_start:
            logits = disc(torch.cat([x, xrec.detach()]))  # (2B, 1, h, w): reaches D only
            d_loss = hinge_d_loss(*logits.chunk(2))
            frozen = {k: p.detach() for k, p in disc.named_parameters()}
            g_loss = -torch.func.functional_call(disc, frozen, (xrec,)).mean()  # reaches G only
            w = (
                adaptive_weight(nll, g_loss, self.vqgan.decoder.last_layer)
                if c.adaptive_weight and self.training
                else torch.ones(())
            )
            loss = loss + c.disc_weight * w * g_loss + d_loss
            real, fake = logits.chunk(2)
            out.update(
                g_loss=g_loss,
                d_loss=d_loss,
                d_weight=w,
                logits_real=real.mean(),
                logits_fake=fake.mean(),
            )
        else:
            loss = loss + 0.0 * sum(p.sum() for p in disc.parameters())
        out["batch_usage"] = tokens.unique().numel() / self.vqgan.cfg.codebook_size
        if restart:
            out["restarted_codes"] = self.vqgan.quantizer.restarted
        return loss, {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
