"""The VQ-GAN's architecture configs, without torch: ``VQGANConfig`` and the named
architectures in ``configs/vqgan/*.json``. A pipeline's params are checked against these when it
loads (``mmflow status`` and a cached run import no torch); :mod:`mmflow.models.vqgan` builds the
model from them and re-exports them."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs" / "vqgan"  # one folder per model family


@dataclass(frozen=True, kw_only=True)
class VQGANConfig:
    image_size: int = 32  # training and preprocessing resolution (the model is convolutional)
    channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one level each; f = 2 ** (levels - 1)
    num_res_blocks: int = 1  # per level in the encoder (the decoder has one more)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sides with self-attention
    mid_attention: bool = True  # attention in the middle block, at the token grid
    # True: each code sees only its own f x f pixel patch (per-patch MLP encoder); the same
    # patch always gets the same code, so the codes compose (see PatchEncoder)
    local_encoder: bool = False
    z_channels: int = 64  # encoder output / decoder input width
    dropout: float = 0.0
    codebook_size: int = 512
    codebook_dim: int = 8  # low: LlamaGen's lookup keeps usage high in 8 dimensions
    commitment_beta: float = 0.25  # encoder commitment, relative to the codebook loss
    usage_decay: float = 0.98  # EMA of each code's share of tokens
    dead_threshold: float = 0.1  # a code is dead below this fraction of the mean share 1/K

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        widths = [self.channels * m for m in self.channel_mult] + [self.z_channels]
        if not self.channel_mult or any(w % 8 for w in widths):
            raise ValueError(f"channel widths {widths} must be multiples of 8 (group norm)")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by f={self.downsample_factor}"
            )
        if self.codebook_size < 2 or self.codebook_dim < 1 or self.num_res_blocks < 1:
            raise ValueError("codebook_size >= 2, codebook_dim >= 1 and num_res_blocks >= 1 please")
        if not 0 < self.usage_decay < 1:
            raise ValueError("usage_decay must be in (0, 1)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQGANConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown VQ-GAN config keys {sorted(unknown)} (known: {sorted(known)})"
            )
        return cls(**d)


def list_archs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def vqgan_config(arch: str, overrides: dict[str, Any] | None = None) -> VQGANConfig:
    """A named architecture, with fields replaced by ``overrides``."""
    path = CONFIG_DIR / f"{arch}.json"
    if not path.exists():
        raise ValueError(f"unknown VQ-GAN architecture {arch!r} (known: {', '.join(list_archs())})")
    return VQGANConfig.from_dict({**json.loads(path.read_text()), **(overrides or {})})
