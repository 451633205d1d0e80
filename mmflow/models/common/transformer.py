"""The decoder-only transformer shared by mmflow's language models (joint stream, LLaVA).

    embeddings (B, T, d)
      -> n_layers x Block (pre-norm):  x + Attention(RMSNorm(x)),  x + SwiGLU(RMSNorm(x))
      -> RMSNorm -> hidden states (B, T, d)

Attention is causal multi-head attention through ``F.scaled_dot_product_attention``, with
rotary positions (precomputed cos/sin, indexed by absolute position ``start_pos + t``, so a
sequence can be continued from a KV cache) and optional QK-norm: an RMSNorm over each head's
queries and keys, which Chameleon needed to keep a mixed text/image model from diverging.
The cache is preallocated once per layer (:class:`KVCache`), so sampling writes into it in
place instead of concatenating a growing tensor every step.

The embedding and the output head belong to the model family (``models/joint.py``), which
owns the vocabulary; this file only maps embeddings to hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# torch-free, so a pipeline's params are checked without torch; re-exported here
from mmflow.models.common.transformer_config import TransformerConfig  # noqa: F401

# --- norm, rotary, cache ------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        # statistics in float32: the mean square of bf16 activations loses the small ones
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return y * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_len, head_dim / 2), float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by the angles of its positions, cos/sin (T, hs / 2).

    The half-split pairing (dimension i with i + hs/2) is Llama's in Hugging Face's layout,
    so weights can be exported without permuting q and k.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class KVCache:
    """One layer's keys and values, preallocated to (B, nh, max_len, hs)."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, *, device, dtype):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """Write (B, nh, T, hs) at positions [start_pos, start_pos + T); all keys and values so far."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nh, end, hs)


# --- attention, MLP, block ----------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # one matmul for q, k and v
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # (B, T, nh, hs)
        q, k = self.q_norm(q), self.k_norm(k)  # per head, before rotary (Chameleon, OLMo 2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            k, v = cache.update(k, v, start_pos)  # (B, nh, S, hs), S = start_pos + T
            # an explicit mask: SDPA's is_causal aligns the triangle top-left, wrong when S > T
            mask = None
            if T > 1:
                key_pos = torch.arange(k.shape[2], device=x.device)
                query_pos = start_pos + torch.arange(T, device=x.device)
                mask = key_pos[None, :] <= query_pos[:, None]  # (T, S), True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, d)
        return self.proj(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, start_pos))
        return x + self.drop(self.mlp(self.mlp_norm(x)))  # (B, T, d)


# --- the stack ----------------------------------------------------------------------------------


class Decoder(nn.Module):
    """Blocks and the final norm over embeddings (B, T, d), from absolute position ``start_pos``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # not persistent: recomputed from the config, so checkpoints hold weights only
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_fn: Callable | None = None

    def enable_checkpointing(self, fn: Callable | None = None) -> None:
        """Recompute each block in the backward pass (``fn(block, *args)``, torch's by default).

        A hook so DeepSpeed's ``deepspeed.checkpointing.checkpoint`` can stand in; ``disable`` with
        ``self.checkpoint_fn = None``. Only used in training without a cache.
        """
        self.checkpoint_fn = fn or (lambda block, *a: checkpoint(block, *a, use_reentrant=False))

    def init_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> list[KVCache]:
        if max_len > self.cfg.max_seq_len:
            raise ValueError(
                f"cache of {max_len} positions exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        ref = self.norm.weight
        cfg = self.cfg
        return [
            KVCache(
                batch,
                cfg.n_heads,
                max_len,
                cfg.head_dim,
                device=device or ref.device,
                dtype=dtype or ref.dtype,
            )
            for _ in range(cfg.n_layers)
        ]

    def forward(self, x, cache: list[KVCache] | None = None, start_pos: int = 0):
        T = x.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(
                f"positions up to {start_pos + T} exceed the model's max_seq_len {self.cfg.max_seq_len}"
            )
        cos = self.rope_cos[start_pos : start_pos + T]  # (T, hs/2)
        sin = self.rope_sin[start_pos : start_pos + T]
        recompute = self.checkpoint_fn is not None and self.training and cache is None
        for i, block in enumerate(self.blocks):
            if recompute:
                x = self.checkpoint_fn(block, x, cos, sin)
            else:
                x = block(x, cos, sin, None if cache is None else cache[i], start_pos)
        return self.norm(x)  # (B, T, d)


def init_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2's initialisation: N(0, std), residual output projections scaled by 1/sqrt(2 n_layers)
    so the residual stream's variance does not grow with depth."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            scaled = name.endswith(("attn.proj", "mlp.down"))
            nn.init.normal_(
                m.weight, mean=0.0, std=std / math.sqrt(2 * n_layers) if scaled else std
            )
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
