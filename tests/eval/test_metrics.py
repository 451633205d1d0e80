"""Shared evaluation metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mmflow.eval.metrics import perplexity, psnr, retrieval_recall, roc_auc, ssim


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # rounding makes ties
    positive = rng.random(60) < 0.7
    pairs = [(a, b) for a, b in itertools.product(scores[positive], scores[~positive])]
    want = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert roc_auc(scores, positive) == pytest.approx(want)
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    assert np.isnan(roc_auc([0.1, 0.2], [True, True]))


def test_retrieval_recall():
    feats = torch.nn.functional.normalize(torch.randn(32, 16), dim=-1)
    assert retrieval_recall(feats, feats) == {
        "i2t_r1": 1.0,
        "i2t_r5": 1.0,
        "t2i_r1": 1.0,
        "t2i_r5": 1.0,
    }
    shuffled = retrieval_recall(feats, feats.roll(1, dims=0), ks=(1,))
    assert shuffled["i2t_r1"] < 0.2


def test_psnr_ssim_and_perplexity():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    noisy = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    mse = ((noisy - x) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(noisy, x), 10 * torch.log10(1 / mse))
    assert torch.allclose(ssim(x, x), torch.ones(2)) and (ssim(noisy, x) < 1).all()
    assert (ssim(torch.rand(2, 3, 16, 16), x) < ssim(noisy, x)).all()
    assert perplexity(torch.tensor([5, 5, 5, 5, 0])) == pytest.approx(4.0)
    assert perplexity(torch.tensor([10, 0, 0])) == pytest.approx(1.0)
