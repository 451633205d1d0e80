"""Deciding which scored pairs to keep, and how well the decision did.

Works on plain columns (a dict of numpy arrays: ``key``, ``shard``, ``caption``,
``sha256``, ``error``, ``mismatched``, ``clip_score``), so it is the same for
any scorer. The filters, all combinable (a pair must pass every one that is on):

- ``threshold``: a number (keep ``clip_score >= threshold``), or ``auto``: the
  Bayes boundary of a two-component Gaussian mixture fitted to the scores,
  where a score becomes more likely to come from the high (matching) component;
- ``top_fraction``: one global cut over the whole pool (DataComp's baseline);
- ``min_caption_length``: characters, after stripping whitespace;
- ``dedup``: of pairs with the same image sha256, keep the best-scored.

Each dropped pair is counted under the first filter it fails.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from mmflow.eval.metrics import roc_auc

FILTER_REASONS = ("short_caption", "below_threshold", "below_top_fraction", "duplicate")


class FilterSettings(Protocol):
    threshold: float | Literal["auto"] | None
    top_fraction: float | None
    min_caption_length: int
    dedup: bool


@dataclass
class Decision:
    keep: np.ndarray  # bool per row of the (sorted) score table
    # why rows were dropped: the first filter each failed
    reasons: Counter = field(default_factory=Counter)
    thresholds: dict[str, float] = field(default_factory=dict)


def mixture_threshold(scores: np.ndarray, iters: int = 200) -> float | None:
    """Bayes boundary of a two-component 1-D Gaussian mixture fitted by EM; None when it cannot split."""
    x = np.asarray(scores, np.float64)
    if len(x) < 20 or x.std() < 1e-6:
        return None
    mu, sd, w = np.quantile(x, [0.1, 0.9]), np.full(2, x.std() / 2), np.full(2, 0.5)
    for _ in range(iters):
        log_p = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)  # (N, 2)
        r = np.exp(log_p - log_p.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        n = r.sum(0) + 1e-9
        w, mu = n / len(x), (r * x[:, None]).sum(0) / n
        sd = np.sqrt((r * (x[:, None] - mu) ** 2).sum(0) / n) + 1e-6
    lo, hi = np.argsort(mu)
    grid = np.linspace(mu[lo], mu[hi], 4001)
    z = (grid[None] - mu[:, None]) / sd[:, None]  # (2, G)
    dens = w[:, None] / sd[:, None] * np.exp(-0.5 * z**2)
    above = np.nonzero(dens[hi] >= dens[lo])[0]
    return float(grid[above[0]]) if len(above) and w.min() > 0.01 else None


def decide(t: dict[str, np.ndarray], p: FilterSettings) -> Decision:
    """Apply the filters in order (bad, caption length, score, dedup); the first failing one is the reason."""
    n = len(t["key"])
    valid = np.array([e is None for e in t["error"]], bool)
    d = Decision(keep=valid.copy())
    for e in t["error"]:
        if e is not None:
            d.reasons[e.split(":")[0]] += 1
    scores = t["clip_score"]

    def drop(mask: np.ndarray, reason: str) -> None:
        hit = int((d.keep & mask).sum())
        if hit:
            d.reasons[reason] += hit
        d.keep &= ~mask

    lengths = np.array([len((c or "").strip()) for c in t["caption"]])
    drop(lengths < p.min_caption_length, "short_caption")
    valid_scores = scores[valid]
    if p.threshold == "auto":
        auto = mixture_threshold(valid_scores)
        if auto is not None:
            d.thresholds["auto_threshold"] = auto
            drop(valid & (scores < auto), "below_threshold")
    elif p.threshold is not None:
        d.thresholds["threshold"] = float(p.threshold)
        drop(valid & (scores < p.threshold), "below_threshold")
    if p.top_fraction is not None and len(valid_scores):
        k = max(1, math.ceil(p.top_fraction * len(valid_scores)))
        cut = float(np.sort(valid_scores)[::-1][k - 1])  # one global cut; ties at it are kept
        d.thresholds["top_fraction_threshold"] = cut
        drop(valid & (scores < cut), "below_top_fraction")
    if p.dedup:
        best: dict[str, int] = {}
        for i in np.nonzero(d.keep)[0]:  # rows are in (shard, index) order: ties keep the first
            h = t["sha256"][i]
            if h not in best or scores[i] > scores[best[h]]:
                best[h] = i
        dup = d.keep.copy()
        dup[list(best.values())] = False
        drop(dup, "duplicate")
    assert d.keep.sum() + sum(d.reasons.values()) == n
    return d


def evaluate(t: dict[str, np.ndarray], d: Decision) -> dict[str, float]:
    """Ground-truth metrics, where rows say whether their caption is ``mismatched``."""
    known = np.array([m is not None for m in t["mismatched"]], bool)
    out = {"kept_fraction": float(d.keep.mean()) if len(d.keep) else 0.0}
    if not known.any():
        return out
    mis = np.array([bool(m) for m in t["mismatched"]])[known]
    keep, scores = d.keep[known], t["clip_score"][known]
    scored = ~np.isnan(scores)
    out["roc_auc"] = roc_auc(scores[scored], ~mis[scored])
    out["kept_mismatch_rate"] = float(mis[keep].mean()) if keep.any() else 0.0
    out["clean_kept_rate"] = float(keep[~mis].mean()) if (~mis).any() else float("nan")
    out["mismatch_rate"] = float(mis.mean())
    return out


def score_histogram(t: dict[str, np.ndarray], d: Decision):
    """Kept vs dropped scores (and clean vs mismatched when known), thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    scores, scored = t["clip_score"], ~np.isnan(t["clip_score"])
    known = np.array([m is not None for m in t["mismatched"]]) & scored
    fig, axes = plt.subplots(
        1, 2 if known.any() else 1, figsize=(10 if known.any() else 5, 3.5), squeeze=False
    )
    bins = np.linspace(scores[scored].min(), scores[scored].max(), 60) if scored.any() else 10
    ax = axes[0][0]
    ax.hist(scores[scored & d.keep], bins=bins, alpha=0.7, label="kept")
    ax.hist(scores[scored & ~d.keep], bins=bins, alpha=0.7, label="dropped")
    ax.set_title("clip_score: kept vs dropped")
    if known.any():
        mis = np.array([bool(m) for m in t["mismatched"]])
        axes[0][1].hist(scores[known & ~mis], bins=bins, alpha=0.7, label="clean")
        axes[0][1].hist(scores[known & mis], bins=bins, alpha=0.7, label="mismatched")
        axes[0][1].set_title("clip_score: ground truth")
    for a in axes[0]:
        for name, value in d.thresholds.items():
            a.axvline(value, color="k", linestyle="--", linewidth=1, label=name)
        a.set_xlabel("cosine similarity")
        a.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return Image.open(buf)
