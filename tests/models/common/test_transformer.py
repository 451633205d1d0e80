"""The shared decoder blocks: config checks, RMSNorm, rotary positions, causality, the KV cache
against the full forward (one token at a time and in chunks), activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from mmflow.models.common.transformer import (
    Decoder,
    KVCache,
    RMSNorm,
    TransformerConfig,
    apply_rope,
    init_weights,
    rope_tables,
)

CFG = TransformerConfig(dim=32, n_layers=2, n_heads=4, mlp_hidden=48, max_seq_len=24)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


def _decoder(**overrides) -> Decoder:
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**CFG.__dict__, **overrides})
    dec = Decoder(cfg)
    init_weights(dec, cfg.n_layers)
    return dec.eval()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dim": 30}, "not divisible by n_heads"),
        ({"dim": 12, "n_heads": 4}, "must be even for rotary"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"mlp_hidden": -1}, "mlp_hidden must be >= 0"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**CFG.__dict__, **overrides})


def test_default_mlp_width_is_llamas_and_params_match_the_formula():
    assert TransformerConfig(dim=256).mlp_hidden == 704  # 8/3 * 256 = 682.7, up to 64
    for qk_norm in (True, False):
        dec = Decoder(TransformerConfig(**{**CFG.__dict__, "qk_norm": qk_norm}))
        assert sum(p.numel() for p in dec.parameters()) == dec.cfg.block_params()


def test_rmsnorm_unit_rms_and_keeps_dtype():
    x = torch.randn(3, 5, 16) * 7
    y = RMSNorm(16)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-3, rtol=0)
    assert RMSNorm(16).to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_rope_keeps_norms_and_depends_on_relative_position_only():
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        return (
            apply_rope(q, cos[m : m + 1], sin[m : m + 1])
            * apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        ).sum()

    torch.testing.assert_close(apply_rope(q, cos[5:6], sin[5:6]).norm(), q.norm())
    torch.testing.assert_close(score(3, 1), score(12, 10))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_causal_a_later_input_does_not_change_earlier_outputs():
    dec = _decoder()
    x = torch.randn(2, 10, 32)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 32)
    torch.testing.assert_close(dec(x)[:, :6], dec(y)[:, :6])
    assert not torch.allclose(dec(x)[:, 6:], dec(y)[:, 6:])


@pytest.mark.parametrize("qk_norm", [True, False])
def test_kv_cache_one_token_at_a_time_matches_full_forward(qk_norm):
    dec = _decoder(qk_norm=qk_norm)
    x = torch.randn(3, 12, 32)
    full = dec(x)
    cache = dec.init_cache(3, 12)
    steps = [dec(x[:, :5], cache, 0)] + [dec(x[:, t : t + 1], cache, t) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_chunks_after_the_start_use_a_causal_mask():
    dec = _decoder()
    x = torch.randn(2, 12, 32)
    cache = dec.init_cache(2, 16)
    chunks = [dec(x[:, :4], cache, 0), dec(x[:, 4:9], cache, 4), dec(x[:, 9:], cache, 9)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), dec(x), atol=1e-5, rtol=1e-5)


def test_cache_and_context_limits_are_clear():
    dec = _decoder()
    with pytest.raises(ValueError, match="exceeds max_seq_len 24"):
        dec.init_cache(1, 25)
    with pytest.raises(ValueError, match="exceed the model's max_seq_len 24"):
        dec(torch.randn(1, 25, 32))
    cache = KVCache(1, 4, 3, 8, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="holds 3 positions"):
        cache.update(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), 2)


def test_activation_checkpointing_gives_the_same_output_and_gradients():
    x = torch.randn(2, 8, 32)
    grads = []
    for recompute in (False, True):
        dec = _decoder().train()
        if recompute:
            dec.enable_checkpointing()
        dec(x).square().mean().backward()
        grads.append([p.grad.clone() for p in dec.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)

    calls = []
    dec = _decoder().train()
    dec.enable_checkpointing(lambda block, *a: calls.append(1) or block(*a))  # a custom hook
    dec(x)
    assert len(calls) == CFG.n_layers
