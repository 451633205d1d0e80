"""pair_filters: each filter, their combination, the automatic threshold, ground-truth metrics."""

from __future__ import annotations

import numpy as np
import pytest

from mmflow.data.pair_filters import decide, evaluate, mixture_threshold
from mmflow.stages.clip_filter import ClipFilterParams


def table(scores, errors=None, captions=None, sha=None, shards=None, mismatched=None):
    n = len(scores)
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "shard": np.array(shards or [0] * n),
        "caption": np.array(captions or ["a long enough caption"] * n, dtype=object),
        "sha256": np.array(sha or [f"h{i}" for i in range(n)], dtype=object),
        "error": np.array(errors or [None] * n, dtype=object),
        "mismatched": np.array(mismatched or [None] * n, dtype=object),
        "clip_score": np.array(scores, dtype=np.float32),
    }


def test_filters_combine_and_every_drop_has_one_reason():
    t = table(
        [0.9, 0.8, 0.7, 0.6, 0.5, np.nan, 0.95, 0.85],
        errors=[None] * 5 + ["undecodable_image: OSError", None, None],
        captions=["fine caption"] * 6 + ["short", "fine caption"],
        sha=["a", "b", "c", "d", "e", "f", "g", "a"],
    )
    d = decide(
        t, ClipFilterParams(threshold=0.55, top_fraction=None, min_caption_length=6, dedup=True)
    )
    # 0.5 is below the threshold, row 5 is bad, row 6 is short, row 7 loses to its better-scored twin (0)
    assert d.keep.tolist() == [True, True, True, True, False, False, False, False]
    assert d.reasons == {
        "undecodable_image": 1,
        "short_caption": 1,
        "below_threshold": 1,
        "duplicate": 1,
    }
    assert d.thresholds == {"threshold": 0.55}


def test_top_fraction_is_one_global_cut_over_all_shards():
    scores = [0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7, 0.6]  # shard 1 holds all the best pairs
    t = table(scores, shards=[0, 0, 0, 0, 1, 1, 1, 1])
    d = decide(t, ClipFilterParams(threshold=None, top_fraction=0.5))
    assert d.keep.tolist() == [False] * 4 + [True] * 4
    assert d.thresholds["top_fraction_threshold"] == pytest.approx(0.6)
    both = decide(t, ClipFilterParams(threshold=0.75, top_fraction=0.5))  # the stricter one wins
    assert both.keep.sum() == 2 and both.reasons == {"below_threshold": 6}


def test_auto_threshold_sits_between_the_two_modes():
    rng = np.random.default_rng(0)
    clean, bad = rng.normal(0.65, 0.06, 800), rng.normal(0.25, 0.15, 200)
    thr = mixture_threshold(np.concatenate([clean, bad]))
    assert 0.4 < thr < 0.55
    assert (clean >= thr).mean() > 0.95 and (bad >= thr).mean() < 0.1
    assert (
        mixture_threshold(np.array([0.5] * 50)) is None
        and mixture_threshold(np.array([0.1, 0.9])) is None
    )


def test_ground_truth_metrics():
    t = table([0.9, 0.8, 0.3, 0.7, 0.2], mismatched=[False, False, False, True, True])
    d = decide(t, ClipFilterParams(threshold=0.5))
    m = evaluate(t, d)
    assert m["kept_fraction"] == pytest.approx(3 / 5)
    assert m["kept_mismatch_rate"] == pytest.approx(1 / 3)
    assert m["clean_kept_rate"] == pytest.approx(2 / 3)
    # 5 of the 6 (clean, mismatched) pairs are in the right order
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert "roc_auc" not in evaluate(table([0.9, 0.1]), d)
