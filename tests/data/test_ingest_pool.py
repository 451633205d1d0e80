"""ingest_pool: every item exactly once, bounded look-ahead, a stuck call given up and replaced."""

from __future__ import annotations

import random
import threading
import time

from mmflow.data.ingest_pool import run_bounded


def test_every_item_comes_out_once():
    def work(i):
        time.sleep(random.random() / 200)
        return i * 2

    out = list(run_bounded(range(200), work, threads=8, hard_limit=10))
    assert sorted(i for i, _ in out) == list(range(200))
    assert all(r == i * 2 for i, r in out)


def test_the_input_is_read_only_a_bounded_way_ahead():
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield i

    gate = threading.Event()
    results = run_bounded(items(), lambda i: gate.wait(5) and i, threads=4, hard_limit=10)
    time.sleep(0.2)
    gate.set()
    next(results)
    assert pulled <= 2 * 4 + 1
    results.close()


def test_exceptions_are_results_not_crashes():
    def work(i):
        if i == 3:
            raise ValueError("bad row")
        return i

    out = dict(run_bounded(range(6), work, threads=2, hard_limit=10))
    assert isinstance(out[3], ValueError) and out[5] == 5


def test_a_stuck_call_is_given_up_once_and_the_rest_go_on():
    release = threading.Event()

    def work(i):
        if i == 0:
            release.wait(30)  # hangs like a DNS lookup that never answers
        return i

    start = time.monotonic()
    out = list(run_bounded(range(20), work, threads=2, hard_limit=0.5, poll=0.05))
    elapsed = time.monotonic() - start
    release.set()
    assert sorted(i for i, _ in out) == list(range(20))  # once each, the stuck one included
    assert dict(out)[0] is None and all(r == i for i, r in out if i)
    assert elapsed < 3
