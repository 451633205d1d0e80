"""The held-out split, by key: the same samples are held out by every stage and on every run,
whatever the sharding or the number of workers."""

from __future__ import annotations

import hashlib


def is_held_out(key: str, fraction: float) -> bool:
    """True for about ``fraction`` of all keys, decided by the key's hash alone."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) < fraction * 2**32
