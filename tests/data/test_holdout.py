"""The held-out split: decided by the key alone, about ``fraction`` of all keys, nested."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmflow.data.holdout import is_held_out

KEYS = [f"{i:09d}" for i in range(20_000)]  # img2dataset-style sequential keys


def test_deterministic_within_and_across_processes():
    first = [is_held_out(k, 0.1) for k in KEYS[:500]]
    assert first == [is_held_out(k, 0.1) for k in KEYS[:500]]
    # another interpreter with another string-hash seed decides the same way
    code = (
        "from mmflow.data.holdout import is_held_out\n"
        "print(''.join('1' if is_held_out(f'{i:09d}', 0.1) else '0' for i in range(500)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        check=True,
    ).stdout.strip()
    assert out == "".join("1" if h else "0" for h in first)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9])
def test_share_is_close_to_the_fraction(fraction):
    share = sum(is_held_out(k, fraction) for k in KEYS) / len(KEYS)
    sigma = (fraction * (1 - fraction) / len(KEYS)) ** 0.5
    assert abs(share - fraction) < 5 * sigma


def test_edge_fractions():
    assert not any(is_held_out(k, 0.0) for k in KEYS)
    assert all(is_held_out(k, 1.0) for k in KEYS)
    assert not any(is_held_out(k, -0.5) for k in KEYS[:100])
    assert all(is_held_out(k, 1.5) for k in KEYS[:100])
    assert is_held_out("", 1.0) and not is_held_out("", 0.0)


def test_a_larger_fraction_holds_out_a_superset():
    """Raising the fraction only adds keys: what was held out never leaks into training."""
    small = {k for k in KEYS if is_held_out(k, 0.05)}
    large = {k for k in KEYS if is_held_out(k, 0.2)}
    assert small and small < large


def test_the_split_does_not_follow_the_key_order():
    """Sequential keys: held-out ones are spread over the range, not a block at one end."""
    held = [i for i, k in enumerate(KEYS) if is_held_out(k, 0.1)]
    quarters = [sum(q * 5000 <= i < (q + 1) * 5000 for i in held) for q in range(4)]
    assert all(abs(n - 500) < 5 * (500 * 0.9) ** 0.5 for n in quarters)
