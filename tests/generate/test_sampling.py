"""Sampling: the cached loop against the no-cache reference (greedy and seeded), top-k and top-p,
classifier-free guidance at its ends, allowed ranges and masks, stopping, and a tiny model
trained on two pairs drawing each one's picture and caption back."""

from __future__ import annotations

import pytest
import torch

from mmflow.generate.sampling import (
    SamplingConfig,
    filter_top_k_top_p,
    generate_caption_ids,
    generate_image_tokens,
    guide,
    pick,
    sample,
    sample_no_cache,
)
from mmflow.models.joint import JointConfig, JointTransformer, JointVocab

VOCAB = JointVocab(text_vocab=10, codebook_size=8, image_tokens=4, max_text_len=4)
CFG = JointConfig(dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=16)
GREEDY = SamplingConfig(temperature=0)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


TEXTS = [[1, 2], [3], [4, 5, 6], [7]]
IMAGES = [[0, 1, 2, 3], [7, 6, 5, 4], [2, 2, 5, 5], [6, 1, 6, 1]]


@pytest.fixture(scope="module")
def random_model():
    """Untrained: its draws are diverse, so seeded loops that agree agree on something."""
    torch.manual_seed(0)
    return JointTransformer(CFG, VOCAB).eval()


@pytest.fixture(scope="module")
def trained():
    """Trained on four pairs both ways and with the caption dropped: its greedy draws depend on
    the prompt, and the empty caption gives a different, unconditional picture."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = JointTransformer(CFG, VOCAB)
    parts = [
        VOCAB.batch(TEXTS, IMAGES).inputs_targets(),
        VOCAB.batch(TEXTS, IMAGES, i2t_share=1.0).inputs_targets(),
        VOCAB.batch(TEXTS[:1], IMAGES[:1], cond_dropout=1.0).inputs_targets(),
    ]
    inputs, targets = (torch.cat(p) for p in zip(*parts, strict=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(inputs, targets)[1]["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def _prefix(*texts):
    return torch.stack([VOCAB.t2i_prefix(t) for t in texts])  # (B, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"guidance_scale": -0.5}, "guidance_scale must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_top_k_top_p(logits, top_k=2)).tolist() == [
        [True, True, False, False]
    ]
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.75)).tolist() == [
        [True, True, False, False]
    ]
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.85)).tolist() == [
        [True, True, True, False]
    ]
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.1)).tolist() == [
        [True, False, False, False]
    ]
    shuffled = logits[:, [2, 0, 3, 1]]  # the nucleus follows the ids, not their positions
    assert torch.isfinite(filter_top_k_top_p(shuffled, top_p=0.75)).tolist() == [
        [False, True, False, True]
    ]
    g = torch.Generator().manual_seed(0)
    draws = pick(logits.expand(2000, -1), SamplingConfig(top_p=0.75), g)
    assert set(draws.tolist()) == {0, 1}
    assert 0.55 < (draws == 0).float().mean() < 0.7  # 0.5 / 0.8 renormalised


@pytest.mark.parametrize(
    "cfg",
    [GREEDY, SamplingConfig(seed=3), SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, seed=1)],
    ids=["greedy", "seeded", "filtered"],
)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("which", ["random_model", "trained"])
def test_cached_sampler_draws_what_the_no_cache_loop_draws(request, which, cfg, guided):
    model = request.getfixturevalue(which)
    prefix = _prefix([1, 2], [3], [4, 5, 6])
    uncond = VOCAB.t2i_prefix(drop_text=True)[None] if guided else None
    cfg = SamplingConfig(**{**cfg.__dict__, "guidance_scale": 2.5})
    cached = sample(model, prefix, 6, cfg, uncond_prefix=uncond)
    assert cached.shape == (3, 6)
    assert torch.equal(cached, sample_no_cache(model, prefix, 6, cfg, uncond_prefix=uncond))


def test_top_k_1_is_greedy(trained):
    prefix = _prefix(*TEXTS)
    greedy = sample(trained, prefix, 4, GREEDY)
    assert greedy.unique(dim=0).shape[0] == 4  # one picture per prompt: greedy is not trivial here
    assert torch.equal(sample(trained, prefix, 4, SamplingConfig(top_k=1, seed=5)), greedy)


def test_seeds_reproduce_and_differ(random_model):
    prefix = _prefix([1, 2], [7])
    a = sample(random_model, prefix, 8, SamplingConfig(seed=1))
    assert torch.equal(a, sample(random_model, prefix, 8, SamplingConfig(seed=1)))
    assert not torch.equal(a, sample(random_model, prefix, 8, SamplingConfig(seed=2)))


def test_guidance_scale_0_is_unconditional_and_1_conditional(trained):
    cond, uncond = _prefix(*TEXTS), _prefix([], [], [], [])
    assert not torch.equal(sample(trained, cond, 4, GREEDY), sample(trained, uncond, 4, GREEDY))
    for scale, alone in [(0.0, uncond), (1.0, cond)]:
        cfg = SamplingConfig(temperature=0, guidance_scale=scale)
        guided = sample(trained, cond, 4, cfg, uncond_prefix=uncond[:1])  # (1, T) serves every row
        assert torch.equal(guided, sample(trained, alone, 4, GREEDY))


def test_guide_combines_the_doubled_batch():
    cond, uncond = torch.tensor([[1.0, 4.0]]), torch.tensor([[2.0, 1.0]])
    both = torch.cat([cond, uncond])
    torch.testing.assert_close(guide(both, 1, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(guide(cond, 1, None), cond)


def test_allowed_ranges_and_masks_are_respected(random_model):
    model = random_model
    prefix = _prefix([1], [2], [3], [4])
    codes = sample(model, prefix, 8, SamplingConfig(seed=0), allowed=VOCAB.image_range)
    assert ((codes >= 10) & (codes < 18)).all()
    mask = torch.zeros(VOCAB.size, dtype=torch.bool)
    mask[[2, 5]] = True
    assert set(
        sample(model, prefix, 8, SamplingConfig(seed=0), allowed=mask).unique().tolist()
    ) <= {2, 5}
    with pytest.raises(ValueError, match="is not inside"):
        sample(model, prefix, 2, GREEDY, allowed=(5, 99))
    with pytest.raises(ValueError, match="allows no id"):
        sample(model, prefix, 2, GREEDY, allowed=torch.zeros(VOCAB.size, dtype=torch.bool))


def test_stop_token_ends_the_loop_once_every_row_has_it(random_model, trained):
    mask = torch.zeros(VOCAB.size, dtype=torch.bool)
    mask[VOCAB.eot] = True  # only the stop token: every row stops at the first draw
    assert sample(
        random_model, _prefix([1], [2]), 8, GREEDY, allowed=mask, stop_token=VOCAB.eot
    ).shape == (2, 1)
    prefix = torch.stack([VOCAB.i2t_prefix(img) for img in IMAGES])
    drawn = sample(trained, prefix, 8, GREEDY, allowed=VOCAB.caption_mask(), stop_token=VOCAB.eot)
    assert drawn.shape == (4, 4)  # the longest caption, 3 ids, and its <eot>
    assert drawn[2].tolist() == [*TEXTS[2], VOCAB.eot] and drawn[0, :3].tolist() == [
        *TEXTS[0],
        VOCAB.eot,
    ]


def test_sampling_restores_training_mode(random_model):
    model = random_model
    model.train()
    sample(model, _prefix([1]), 2, GREEDY)
    assert model.training
    model.eval()


def test_trained_model_draws_each_captions_picture_and_each_pictures_caption(trained):
    assert generate_image_tokens(trained, VOCAB, TEXTS, GREEDY).tolist() == IMAGES
    guided = generate_image_tokens(
        trained, VOCAB, TEXTS, SamplingConfig(guidance_scale=3.0, top_k=2)
    )
    assert guided.shape == (4, 4) and ((guided >= 0) & (guided < 8)).all()
    assert generate_caption_ids(trained, VOCAB, torch.tensor(IMAGES), GREEDY) == TEXTS
    assert generate_caption_ids(trained, VOCAB, IMAGES, GREEDY, max_len=1) == [[1], [3], [4], [7]]
