"""The VQ-GAN image tokenizer (taming-transformers' autoencoder, LlamaGen's quantizer).

    image (B, 3, H, W) in [-1, 1]
      -> Encoder: conv, residual blocks per level, a stride-2 conv between levels, mid attention
      -> quant_conv to ``codebook_dim`` channels, l2-normalised
      -> Quantizer: nearest of ``codebook_size`` l2-normalised codes -> tokens (B, H/f, W/f)
      -> post_quant_conv, Decoder (the Encoder mirrored, nearest-neighbour upsampling)
      -> image (B, 3, H, W)

The lookup is LlamaGen's cure for codebook collapse: a low-dimensional (8) code space on
the unit sphere, where the nearest code is the one of largest cosine. Codes the data stopped
using are restarted on encoder outputs of the current batch (Jukebox's "dead-code restart";
the first, at step 0, initialises the whole codebook from data). Usage is an EMA of each
code's share of tokens, summed over every DDP rank.

Architectures: ``configs/vqgan/*.json`` behind one factory, :func:`create_vqgan` (model and
preprocessing); :func:`save_vqgan` / :func:`load_vqgan` write and read a folder (weights only).
Losses, discriminator and training wrapper: :mod:`mmflow.models.vqgan_losses`."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# the configs are torch-free (a pipeline loads without torch); re-exported here
from mmflow.models.vqgan_config import (  # noqa: F401
    CONFIG_DIR,
    VQGANConfig,
    list_archs,
    vqgan_config,
)

WEIGHTS_FILE = "vqgan.pt"  # the generator's state dict (no discriminator)
CONFIG_FILE = "vqgan.json"  # {"arch": ..., "config": VQGANConfig fields, ...meta}


# --- building blocks ----------------------------------------------------------------------------


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):  # (B, c_in, h, w) -> (B, c_out, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, c, h, w)
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, hw, c)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):  # (B, c, h, w) -> (B, c, h/2, w/2); taming's asymmetric pad
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # (B, c, h, w) -> (B, c, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level_blocks(c_in: int, c_out: int, n: int, attn: bool, dropout: float) -> nn.ModuleList:
    blocks = nn.ModuleList()
    for i in range(n):
        blocks.append(ResBlock(c_in if i == 0 else c_out, c_out, dropout))
        if attn:
            blocks.append(AttnBlock(c_out))
    return blocks


def _mid(c: int, cfg: VQGANConfig) -> nn.Sequential:
    attn = AttnBlock(c) if cfg.mid_attention else nn.Identity()
    return nn.Sequential(ResBlock(c, c, cfg.dropout), attn, ResBlock(c, c, cfg.dropout))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.levels, self.down = nn.ModuleList(), nn.ModuleList()
        res, c_in = cfg.image_size, widths[0]
        for i, c in enumerate(widths):
            attn = res in cfg.attn_resolutions
            self.levels.append(_level_blocks(c_in, c, cfg.num_res_blocks, attn, cfg.dropout))
            last = i == len(widths) - 1
            self.down.append(nn.Identity() if last else Downsample(c))
            res, c_in = (res if last else res // 2), c
        self.mid = _mid(c_in, cfg)
        self.norm_out, self.conv_out = _norm(c_in), nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, z_channels, H/f, W/f)
        h = self.conv_in(x)
        for blocks, down in zip(self.levels, self.down, strict=True):
            for block in blocks:
                h = block(h)
            h = down(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class PatchEncoder(nn.Module):
    """Each f x f patch alone -> its z, by a residual MLP (1x1 convs, no norm across positions).

    The convolutional encoder's receptive field and group norm make a code depend on the whole
    picture: on flat-colour scenes the same background patch gets dozens of codes, depending on
    what else the picture holds, and a model over the tokens must learn each variant apart. A
    patch-local encoder gives a patch one code wherever it is; the decoder keeps its context."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        f, width = cfg.downsample_factor, cfg.channels * cfg.channel_mult[-1]
        self.f = f
        self.conv_in = nn.Conv2d(3 * f * f, width, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(), nn.Conv2d(width, 2 * width, 1), nn.SiLU(), nn.Conv2d(2 * width, width, 1)
            )
            for _ in range(cfg.num_res_blocks + 1)
        )
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 1)

    def forward(self, x):  # (B, 3, H, W) -> (B, z_channels, H/f, W/f)
        h = self.conv_in(F.pixel_unshuffle(x, self.f))
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(F.silu(h))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult][::-1]  # deepest level first
        res = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = _mid(widths[0], cfg)
        self.levels, self.up = nn.ModuleList(), nn.ModuleList()
        c_in = widths[0]
        for i, c in enumerate(widths):
            attn = res in cfg.attn_resolutions
            self.levels.append(_level_blocks(c_in, c, cfg.num_res_blocks + 1, attn, cfg.dropout))
            last = i == len(widths) - 1
            self.up.append(nn.Identity() if last else Upsample(c))
            res, c_in = (res if last else res * 2), c
        self.norm_out, self.conv_out = _norm(c_in), nn.Conv2d(c_in, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the GAN's adaptive weight balances gradients at."""
        return self.conv_out.weight

    def forward(self, z):  # (B, z_channels, h, w) -> (B, 3, h*f, w*f)
        h = self.mid(self.conv_in(z))
        for blocks, up in zip(self.levels, self.up, strict=True):
            for block in blocks:
                h = block(h)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- the quantizer ------------------------------------------------------------------------------


class Quantizer(nn.Module):
    """Nearest l2-normalised code, straight-through gradients, codebook and commitment losses."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Parameter(torch.randn(cfg.codebook_size, cfg.codebook_dim))
        self.register_buffer("usage", torch.zeros(cfg.codebook_size))  # EMA share of tokens
        self.restarted = 0  # codes moved by the last restart, for the training log

    def codebook(self) -> torch.Tensor:  # (K, d), unit rows
        return F.normalize(self.embedding, dim=1)

    def forward(self, z: torch.Tensor, restart: bool = False):
        """(B, d, h, w) -> z_q (B, d, h, w), tokens (B, h, w), loss, flat unit z (B*h*w, d).
        With ``restart`` (training only) dead codes move onto this batch first."""
        B, d, H, W = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d).float(), dim=1)  # (N, d)
        if restart and self.training:  # before the lookup: the graph must see the new codes
            self.restart_dead_codes(flat.detach())
        codes = self.codebook()
        with torch.no_grad():
            idx = (flat @ codes.T).argmax(1)  # (N,): on the sphere, nearest = largest cosine
        zq = codes[idx]  # (N, d)
        # codebook loss pulls codes to the encoder; commitment pulls the encoder to its codes
        loss = F.mse_loss(zq, flat.detach()) + self.cfg.commitment_beta * F.mse_loss(
            flat, zq.detach()
        )
        zq = flat + (zq - flat).detach()  # straight-through
        if self.training:
            self._track_usage(idx)
        zq = zq.reshape(B, H, W, d).permute(0, 3, 1, 2).to(z.dtype)
        return zq, idx.reshape(B, H, W), loss, flat.detach()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, d, h, w)
        return self.codebook()[tokens].permute(0, 3, 1, 2)

    @torch.no_grad()
    def _track_usage(self, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.cfg.codebook_size).float()
        if dist.is_initialized():
            dist.all_reduce(counts)
        self.usage.mul_(self.cfg.usage_decay).add_(
            counts / counts.sum(), alpha=1 - self.cfg.usage_decay
        )

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Move codes whose usage share fell below ``dead_threshold / K`` onto encoder outputs
        ``flat`` (N, d) drawn at random; rank 0 decides and draws for every rank. Returns how
        many moved. The first call, with no usage yet, initialises the codebook from the data."""
        K = self.cfg.codebook_size
        dead = self.usage < self.cfg.dead_threshold / K  # (K,)
        picks = flat[torch.randint(len(flat), (K,), device=flat.device)]  # (K, d)
        new = F.normalize(picks + 0.01 * torch.randn_like(picks), dim=1)  # jitter splits twins
        if dist.is_initialized():
            dead = dead.to(torch.uint8)
            dist.broadcast(dead, src=0)
            dist.broadcast(new, src=0)
            dead = dead.bool()
        self.embedding[dead] = new[dead].to(self.embedding.dtype)
        self.usage[dead] = 1.0 / K  # a grace period before it can be judged dead again
        self.restarted = int(dead.sum())
        return self.restarted


# --- the model ----------------------------------------------------------------------------------


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg) if cfg.local_encoder else Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.quantizer = Quantizer(cfg)

    def encode(self, x: torch.Tensor, restart: bool = False):
        """(B, 3, H, W) in [-1, 1] -> z_q (B, d, h, w), tokens (B, h, w), vq loss, flat z (N, d)."""
        return self.quantizer(self.quant_conv(self.encoder(x)), restart)

    def decode(self, zq: torch.Tensor) -> torch.Tensor:  # (B, d, h, w) -> (B, 3, H, W)
        return self.decoder(self.post_quant_conv(zq))

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, h, w) int64
        return self.encode(x)[1]

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, 3, H, W)
        return self.decode(self.quantizer.embed(tokens))

    def forward(self, x: torch.Tensor, restart: bool = False):
        """(B, 3, H, W) -> reconstruction (B, 3, H, W), vq loss, tokens (B, h, w), flat z (N, d)."""
        zq, tokens, vq_loss, flat = self.encode(x, restart)
        return self.decode(zq), vq_loss, tokens, flat


# --- preprocessing, registry, saving and loading -----------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> (3, S, S) float tensor in [-1, 1]: shorter side to S, centre crop."""

    image_size: int

    def pixels(self, image) -> torch.Tensor:
        """The same, as uint8 (3, S, S): a quarter of the memory, for caches and transport."""
        import numpy as np
        from PIL import Image

        image, s = image.convert("RGB"), self.image_size
        if image.size != (s, s):
            w, h = image.size
            scale = s / min(w, h)
            image = image.resize(
                (max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC
            )
            left, top = (image.size[0] - s) // 2, (image.size[1] - s) // 2
            image = image.crop((left, top, left + s, top + s))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __call__(self, image) -> torch.Tensor:
        return from_uint8(self.pixels(image))


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float in [-1, 1], the model's input space."""
    return pixels.float() / 127.5 - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1], clamped (what PSNR and PNGs are measured in)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_pil(x: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL RGB image."""
    from PIL import Image

    return Image.fromarray((to_unit(x) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def create_vqgan(cfg: VQGANConfig | str) -> tuple[VQGAN, Preprocess]:
    """The model (random weights) and its preprocessing, from a config or an architecture name."""
    cfg = vqgan_config(cfg) if isinstance(cfg, str) else cfg
    return VQGAN(cfg), Preprocess(cfg.image_size)


def save_vqgan(model: VQGAN, folder: str, arch: str, **meta: Any) -> None:
    """``vqgan.json`` (architecture and meta) and ``vqgan.pt`` (weights) into a local folder."""
    os.makedirs(folder, exist_ok=True)
    torch.save(
        {k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(folder, WEIGHTS_FILE)
    )
    info = {"arch": arch, "config": asdict(model.cfg), "format": "mmflow-vqgan", **meta}
    Path(folder, CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


def load_vqgan(folder: str, device: str = "cpu") -> tuple[VQGAN, Preprocess, dict[str, Any]]:
    """(model in eval mode on ``device``, its preprocessing, the folder's ``vqgan.json``)."""
    info = json.loads(Path(folder, CONFIG_FILE).read_text())
    model, preprocess = create_vqgan(VQGANConfig.from_dict(info["config"]))
    model.load_state_dict(
        torch.load(Path(folder, WEIGHTS_FILE), map_location="cpu", weights_only=True)
    )
    return model.to(device).eval(), preprocess, info


def describe(cfg: VQGANConfig) -> str:  # for logs: f4, 8x8 tokens of 512 codes (8-d), ...
    g, bits = cfg.grid_size, math.log2(cfg.codebook_size)
    return f"f{cfg.downsample_factor}, {g}x{g} tokens of {cfg.codebook_size} codes ({cfg.codebook_dim}-d), {bits:.0f} bits each"
