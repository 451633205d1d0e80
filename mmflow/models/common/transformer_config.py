"""The shared decoder's shape (:class:`TransformerConfig`), without torch: the model families'
configs derive from it and are checked when a pipeline loads, which imports no torch.
:mod:`mmflow.models.common.transformer` builds the decoder from it and re-exports it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = (
        0  # SwiGLU width; 0 = 8/3 * dim rounded up to 64 (Llama: same params as 4d GELU)
    )
    max_seq_len: int = 128  # length of the rotary tables, hence of any sequence or cache
    qk_norm: bool = True
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("dim", "n_layers", "n_heads", "max_seq_len"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(
                    f"{name}.{field} must be a positive integer, got {getattr(self, field)!r}"
                )
        if self.dim % self.n_heads:
            raise ValueError(f"{name}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(
                f"{name}: head_dim {self.head_dim} (dim / n_heads) must be even for rotary"
            )
        if self.mlp_hidden < 0:
            raise ValueError(
                f"{name}.mlp_hidden must be >= 0 (0 = 8/3 * dim), got {self.mlp_hidden}"
            )
        if self.mlp_hidden == 0:
            object.__setattr__(self, "mlp_hidden", 64 * math.ceil(8 * self.dim / 3 / 64))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"{name}: rope_theta and norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def block_params(self) -> int:
        """Parameters of the decoder (blocks and final norm), without embeddings or head."""
        d, h = self.dim, self.mlp_hidden
        per_layer = 4 * d * d + 3 * d * h + 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        return self.n_layers * per_layer + d
