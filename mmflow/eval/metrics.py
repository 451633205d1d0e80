"""Evaluation metrics shared by every stage and task: retrieval recall@k, ROC AUC, image
quality (PSNR, SSIM), codebook perplexity. Pure functions of arrays or tensors; torch and
numpy are imported inside the functions that need them, so importing this module is cheap."""

from __future__ import annotations


def retrieval_recall(
    image_features, text_features, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Image->text and text->image recall@k of matched pairs (row i of each); features L2-normalised."""
    import torch

    sim = image_features @ text_features.T  # (N, N)
    target = torch.arange(len(sim), device=sim.device)
    out = {}
    for direction, logits in (("i2t", sim), ("t2i", sim.T)):
        rank = (logits > logits[target, target][:, None]).sum(1)  # how many beat the true partner
        for k in ks:
            out[f"{direction}_r{k}"] = float((rank < k).float().mean())
    return out


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative (ties count half)."""
    import numpy as np

    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def psnr(x, y):
    """Per-image PSNR in dB of two (B, 3, H, W) tensors in [0, 1] -> (B,)."""
    import torch

    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x, y, window: int = 11, sigma: float = 1.5):
    """Per-image SSIM (Wang et al. 2004: Gaussian window, K1 0.01, K2 0.03, per channel) of
    two (B, 3, H, W) tensors in [0, 1] -> (B,). The window shrinks for images under 11 px."""
    import torch
    import torch.nn.functional as F

    window = min(window, x.shape[-1], x.shape[-2])
    g = torch.exp(
        -((torch.arange(window, dtype=torch.float32, device=x.device) - window // 2) ** 2)
        / (2 * sigma**2)
    )
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    x, y = x.float(), y.float()
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def perplexity(counts) -> float:
    """exp(entropy) of a code-count histogram: the number of equally used codes it is worth."""
    import torch

    p = counts.float() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
