"""Autoregressive sampling: temperature, top-k, top-p, classifier-free guidance, a KV cache.

    prefix (B, T) --prefill, one forward--> logits of the last position, caches filled
      -> guide: uncond + s * (cond - uncond)   (when an unconditional prefix is given)
      -> allowed ids only -> temperature (0 = greedy) -> top-k -> top-p -> draw with a seeded
         torch.Generator -> the token, fed back one position at a time through the caches

Guidance runs the conditional and the unconditional prefixes as one doubled batch (rows
[0, B) conditional, [B, 2B) unconditional), both continued with the same drawn token, so it
costs one forward per step, not two. ``allowed`` restricts each draw to a range of ids (image
codes when drawing a picture) or a vocabulary mask (text ids and <eot> for a caption).

:func:`sample_no_cache` is the same loop recomputing the whole sequence every step: the
reference the cached loop is tested against, and the baseline of its benchmark.

A model here is anything with ``init_cache(batch, max_len)`` and
``forward(tokens, *, cache=None, start_pos=0, last_only=False) -> (logits, _)``, such as
:class:`mmflow.models.joint.JointTransformer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmflow.models.joint import JointVocab

Allowed = tuple[int, int] | torch.Tensor | None  # [lo, hi) or a (V,) bool mask


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely ids; 0 = all
    top_p: float = 1.0  # keep the smallest set of ids whose probability reaches p; 1 = all
    guidance_scale: float = (
        1.0  # classifier-free guidance s; 1 = conditional only, 0 = unconditional
    )
    seed: int = 0
    max_new_tokens: int | None = None  # caption length limit; None = the model's max_text_len

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(
                f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.guidance_scale < 0:
            raise ValueError(
                f"SamplingConfig.guidance_scale must be >= 0, got {self.guidance_scale}"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )


# --- one draw -----------------------------------------------------------------------------------


def allowed_mask(allowed: Allowed, vocab_size: int, device) -> torch.Tensor | None:
    """(V,) bool, True where an id may be drawn; None = every id."""
    if allowed is None:
        return None
    if isinstance(allowed, torch.Tensor):
        if allowed.shape != (vocab_size,) or allowed.dtype != torch.bool:
            raise ValueError(
                f"an allowed mask is a ({vocab_size},) bool tensor, got {tuple(allowed.shape)} {allowed.dtype}"
            )
        mask = allowed.to(device)
    else:
        lo, hi = allowed
        if not 0 <= lo < hi <= vocab_size:
            raise ValueError(f"allowed range [{lo}, {hi}) is not inside [0, {vocab_size})")
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        mask[lo:hi] = True
    if not mask.any():
        raise ValueError("the allowed mask allows no id")
    return mask


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits with everything outside the top k and the nucleus p set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop an id when the ids more likely than it already reach p (the top one always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) float logits -> (B,) drawn ids."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def guide(logits: torch.Tensor, batch: int, scale: float | None) -> torch.Tensor:
    """(2B, V) [cond; uncond] -> (B, V) ``uncond + s * (cond - uncond)``; (B, V) unchanged if no scale."""
    if scale is None:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + scale * (cond - uncond)


# --- the loops ----------------------------------------------------------------------------------


def _draw(model, prefix, n_new, cfg, allowed, uncond_prefix, stop_token, use_cache):
    if prefix.dim() != 2 or n_new < 1:
        raise ValueError(
            f"prefix_tokens must be (B, T) and n_new >= 1, got {tuple(prefix.shape)}, {n_new}"
        )
    B, T = prefix.shape
    scale = None
    if uncond_prefix is not None:
        # a (1, T) unconditional prefix serves every row
        uncond_prefix = uncond_prefix.to(prefix.device).expand(B, -1)
        if uncond_prefix.shape != prefix.shape:
            raise ValueError(
                f"uncond_prefix {tuple(uncond_prefix.shape)} must match prefix {(B, T)}"
            )
        prefix, scale = torch.cat([prefix, uncond_prefix]), cfg.guidance_scale  # (2B, T)
    generator = torch.Generator(device=prefix.device).manual_seed(cfg.seed)
    cache = model.init_cache(prefix.shape[0], T + n_new) if use_cache else None
    logits, _ = model(prefix, cache=cache, last_only=True)  # (2B or B, 1, V)
    mask = allowed_mask(allowed, logits.shape[-1], logits.device)
    seq, out, done = prefix, [], torch.zeros(B, dtype=torch.bool, device=prefix.device)
    for i in range(n_new):
        token = pick(guide(logits[:, -1], B, scale), cfg, generator, mask)  # (B,)
        out.append(token)
        if stop_token is not None:
            done |= token == stop_token
            if done.all():
                break
        if i + 1 == n_new:
            break
        feed = (token if scale is None else token.repeat(2))[:, None]  # both halves continue alike
        if use_cache:
            logits, _ = model(feed, cache=cache, start_pos=T + i, last_only=True)
        else:
            seq = torch.cat([seq, feed], dim=1)
            logits, _ = model(seq, last_only=True)  # the whole sequence again
    return torch.stack(out, dim=1)  # (B, n)


def _run(model, *args) -> torch.Tensor:
    was_training = model.training
    model.eval()  # no dropout while drawing
    try:
        with torch.inference_mode():
            return _draw(model, *args)
    finally:
        model.train(was_training)


def sample(
    model,
    prefix_tokens: torch.Tensor,
    n_new: int,
    cfg: SamplingConfig,
    allowed: Allowed = None,
    uncond_prefix: torch.Tensor | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """(B, n) drawn continuations of ``prefix_tokens`` (B, T), n <= n_new, with the KV cache.

    Guided when ``uncond_prefix`` (B or 1, T) is given; stops early once every row has drawn
    ``stop_token`` (rows keep drawing after theirs: cut them at their first stop)."""
    return _run(model, prefix_tokens, n_new, cfg, allowed, uncond_prefix, stop_token, True)


def sample_no_cache(
    model,
    prefix_tokens: torch.Tensor,
    n_new: int,
    cfg: SamplingConfig,
    allowed: Allowed = None,
    uncond_prefix: torch.Tensor | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """:func:`sample` without a cache: every step runs the whole sequence again (the reference)."""
    return _run(model, prefix_tokens, n_new, cfg, allowed, uncond_prefix, stop_token, False)


# --- text -> image, image -> text ---------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def generate_image_tokens(
    model, vocab: JointVocab, text_ids_batch: Sequence[Sequence[int]], cfg: SamplingConfig
) -> torch.Tensor:
    """(B, image_tokens) codes in [0, codebook_size), row-major over the grid, one per caption.

    Guided with the empty caption as the unconditional prefix unless ``guidance_scale == 1``
    (then the doubled batch would only reproduce the conditional logits)."""
    device = _device(model)
    prefix = torch.stack([vocab.t2i_prefix(t) for t in text_ids_batch]).to(device)  # (B, T)
    uncond = None
    if cfg.guidance_scale != 1.0:
        uncond = vocab.t2i_prefix(drop_text=True)[None].to(device)  # (1, T)
    tokens = sample(
        model, prefix, vocab.image_tokens, cfg, allowed=vocab.image_range, uncond_prefix=uncond
    )
    return tokens - vocab.image_range[0]


def generate_caption_ids(
    model,
    vocab: JointVocab,
    image_tokens_batch: Sequence[Sequence[int]] | torch.Tensor,
    cfg: SamplingConfig,
    max_len: int | None = None,
) -> list[list[int]]:
    """One caption (text ids, without <eot>) per picture's codes, at most ``max_len`` tokens
    (default ``cfg.max_new_tokens``, then ``vocab.max_text_len``). No guidance: training never
    drops the picture, so there is no unconditional caption model."""
    max_len = max_len or cfg.max_new_tokens or vocab.max_text_len
    device = _device(model)
    prefix = torch.stack([vocab.i2t_prefix(img) for img in image_tokens_batch]).to(device)  # (B, T)
    # max_len text tokens and the <eot> after them, inside the model's context
    n_new = min(max_len + 1, model.cfg.max_seq_len - prefix.shape[1])
    drawn = sample(model, prefix, n_new, cfg, allowed=vocab.caption_mask(), stop_token=vocab.eot)
    captions = []
    for row in drawn.tolist():
        cut = row.index(vocab.eot) if vocab.eot in row else len(row)
        captions.append(row[: min(cut, max_len)])
    return captions
