"""A bounded thread pool for per-URL work that nothing can stall.

``run_bounded(items, fn, threads, hard_limit)`` yields ``(item, result)`` for every item
exactly once (``result`` is what ``fn`` returned, or the exception it raised), in completion order, with at most ``2 * threads`` items in flight (so memory
stays flat however long the input). ``fn`` carries its own timeouts; the pool adds a last line
of defence for what they cannot bound (a DNS lookup that hangs, a pathological decode): an item
running longer than ``hard_limit`` seconds is given up, yielded with ``result=None``, and its
thread is replaced, so one stuck call can neither hold the shard nor shrink the pool. The
late result of a given-up item is dropped: every item comes out once.

``PixelBudget`` bounds what the threads decode at once: ``max_pixels`` bounds one image, but
64 threads each decoding a 80-megapixel photo would hold 20 GB. A thread holds an image's
decoded pixels from the budget while it decodes, resizes and encodes it; when the budget is
spent the next one waits. An image larger than the whole budget (up to ``max_pixels``) runs
alone. The waiting counts towards the row's ``hard_limit``, like any other slowness.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_STOP = object()


class _Job:
    __slots__ = ("item", "started", "finished", "abandoned")

    def __init__(self, item: Any):
        self.item = item
        self.started: float | None = None
        self.finished = False
        self.abandoned = False


def run_bounded(
    items: Iterable[Any],
    fn: Callable[[Any], Any],
    threads: int,
    hard_limit: float,
    poll: float = 0.5,
) -> Iterator[tuple[Any, Any]]:
    todo: queue.Queue = queue.Queue()  # unbounded: in_flight bounds it, and main must never block
    done: queue.Queue = queue.Queue()
    lock = threading.Lock()
    running: set[_Job] = set()

    def worker() -> None:
        while (job := todo.get()) is not _STOP:
            with lock:
                job.started = time.monotonic()
                running.add(job)
            try:
                result = fn(job.item)
            except BaseException as e:  # fn should not raise; if it does, the item still comes out
                result = e
            with lock:
                running.discard(job)
                if job.abandoned:
                    return  # a replacement thread took this one's place
                job.finished = True
            done.put((job, result))

    def spawn() -> None:
        threading.Thread(target=worker, name="ingest-worker", daemon=True).start()

    for _ in range(threads):
        spawn()
    source = iter(items)
    in_flight, exhausted = 0, False
    try:
        while True:
            while not exhausted and in_flight < 2 * threads:
                item = next(source, _STOP)
                if item is _STOP:
                    exhausted = True
                    break
                todo.put(_Job(item))
                in_flight += 1
            if in_flight == 0:
                return
            try:
                job, result = done.get(timeout=poll)
            except queue.Empty:
                for job in _overdue(running, lock, hard_limit):
                    in_flight -= 1
                    spawn()
                    yield job.item, None
                continue
            in_flight -= 1
            yield job.item, result
    finally:  # also when the consumer stops early: drop queued work, then stop the threads
        with contextlib.suppress(queue.Empty):
            while True:
                todo.get_nowait()
        for _ in range(threads):
            todo.put(_STOP)


def _overdue(running: set[_Job], lock: threading.Lock, hard_limit: float) -> list[_Job]:
    now = time.monotonic()
    out = []
    with lock:
        for job in list(running):
            if not job.finished and job.started is not None and now - job.started > hard_limit:
                job.abandoned = True
                running.discard(job)
                out.append(job)
    return out


class PixelBudget:
    """At most ``limit`` decoded pixels held at once by the threads of one task."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._cv:
            while self.used and self.used + pixels > self.limit:
                self._cv.wait()
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cv:
                self.used -= pixels
                self._cv.notify_all()
