"""A training rank's epochs over streamed examples: the first epoch through a shuffle buffer,
the later ones replayed from memory in a fresh order when the whole epoch fit the budget; and
the endless batches a ``TrainTask.train_batches`` cuts from them.

Decoding and preprocessing images is often the costliest part of a small model's step; a rank
whose share of the data fits ``cache_bytes`` does it once. Used by the training stages'
``TrainTask.train_batches``; no torch needed."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class Epochs:
    """``epoch(stream, rng)`` yields one pass; ``size(example)`` is its bytes in the cache.
    ``cache_bytes=None`` keeps every epoch whatever its size: for a caller that decided already
    (ranks reading one Ray Data split must all replay, or all read again)."""

    def __init__(
        self, shuffle_buffer: int, cache_bytes: int | None, size: Callable[[Any], int] | None = None
    ):
        if cache_bytes and size is None:
            raise ValueError("a cache of cache_bytes needs size(example)")
        self.shuffle_buffer, self.cache_bytes, self.size = shuffle_buffer, cache_bytes, size
        self.cached: list | None = None  # the whole epoch, once one was seen whole and fit

    def epoch(self, stream: Callable[[], Iterable[Any]], rng: random.Random) -> Iterator[Any]:
        if self.cached is not None:
            yield from (
                self.cached[i] for i in rng.sample(range(len(self.cached)), len(self.cached))
            )
            return
        unbounded = self.cache_bytes is None
        cache: list | None = [] if unbounded or self.cache_bytes > 0 else None
        budget, buffer = self.cache_bytes or 0, []
        for example in stream():
            if cache is not None:
                cache.append(example)
                if not unbounded:
                    budget -= self.size(example)
                    cache = cache if budget >= 0 else None
            buffer.append(example)
            if len(buffer) >= self.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer
        self.cached = cache


def batches(epoch: Callable[[], Iterable[Any]], batch_size: int, empty: str) -> Iterator[list]:
    """Lists of ``batch_size`` examples from ``epoch()`` after ``epoch()``, forever; a partial
    batch carries over into the next epoch. An epoch without examples raises ``empty``."""
    batch: list = []
    while True:
        seen = 0
        for example in epoch():
            seen += 1
            batch.append(example)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if seen == 0:
            raise RuntimeError(empty)
