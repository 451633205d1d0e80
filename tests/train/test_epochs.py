"""Epochs over a stream: every example once per epoch through a bounded shuffle buffer, later
epochs replayed from memory when the whole epoch fit the cache budget (streamed again when
not), a fresh order each epoch; and the endless batches cut from them."""

from __future__ import annotations

import random

import pytest

from mmflow.train.epochs import Epochs, batches

N = 40


class Stream:
    """A re-readable source of ``n`` examples that counts how often it is read, and how many
    examples it has handed out so far."""

    def __init__(self, n: int = N):
        self.n, self.passes, self.read = n, 0, 0

    def __call__(self):
        self.passes += 1
        for i in range(self.n):
            self.read += 1
            yield i


def run_epochs(epochs: Epochs, stream: Stream, k: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [list(epochs.epoch(stream, rng)) for _ in range(k)]


@pytest.mark.parametrize(
    ("shuffle_buffer", "cache_bytes"), [(1, 0), (8, 0), (8, 10_000), (100, 10_000), (8, 5)]
)
def test_every_example_exactly_once_per_epoch(shuffle_buffer, cache_bytes):
    epochs = Epochs(shuffle_buffer, cache_bytes, size=lambda x: 1)
    for order in run_epochs(epochs, Stream(), 4):
        assert sorted(order) == list(range(N))


def test_later_epochs_replay_from_memory_when_the_epoch_fits():
    stream = Stream()
    epochs = Epochs(8, cache_bytes=N * 10 + 1, size=lambda x: 10)
    orders = run_epochs(epochs, stream, 4)
    assert stream.passes == 1  # decoded once; epochs 2-4 come from memory
    assert sorted(epochs.cached) == list(range(N))
    assert all(sorted(o) == list(range(N)) for o in orders)


def test_an_epoch_over_the_budget_streams_again_every_time():
    stream = Stream()
    sizes = {i: 1 for i in range(N)} | {N - 1: 1000}  # the last example breaks the budget
    epochs = Epochs(8, cache_bytes=500, size=sizes.__getitem__)
    orders = run_epochs(epochs, stream, 3)
    assert stream.passes == 3 and epochs.cached is None
    assert all(sorted(o) == list(range(N)) for o in orders)


def test_no_cache_budget_never_caches():
    stream = Stream()
    epochs = Epochs(8, cache_bytes=0, size=lambda x: pytest.fail("size() is not needed"))
    run_epochs(epochs, stream, 2)
    assert stream.passes == 2 and epochs.cached is None


def test_an_epoch_left_unfinished_is_not_cached():
    """Only an epoch seen whole can be replayed: a consumer that stops early caches nothing."""
    stream = Stream()
    epochs = Epochs(8, cache_bytes=10_000, size=lambda x: 1)
    rng = random.Random(0)
    it = epochs.epoch(stream, rng)
    [next(it) for _ in range(N // 2)]
    it.close()
    assert epochs.cached is None
    assert sorted(epochs.epoch(stream, rng)) == list(range(N)) and stream.passes == 2
    assert epochs.cached is not None


@pytest.mark.parametrize("cache_bytes", [0, 10_000])
def test_each_epoch_has_a_fresh_order(cache_bytes):
    epochs = Epochs(16, cache_bytes, size=lambda x: 1)
    orders = run_epochs(epochs, Stream(), 4)
    assert orders[0] != list(range(N))  # the buffer shuffles the first pass too
    assert len({tuple(o) for o in orders}) == 4
    # the order comes from the rng alone: the same seed gives the same epochs
    assert run_epochs(Epochs(16, cache_bytes, size=lambda x: 1), Stream(), 4) == orders
    assert run_epochs(Epochs(16, cache_bytes, size=lambda x: 1), Stream(), 4, seed=1) != orders


@pytest.mark.parametrize("k", [1, 4, 16])
def test_the_shuffle_buffer_bounds_memory_and_displacement(k):
    """At most ``k`` examples are held while streaming; an example is never yielded more than
    ``k - 1`` places before its stream position (buffer 1 keeps the stream order)."""
    stream, epochs = Stream(), Epochs(k, cache_bytes=0, size=len)
    out = []
    for x in epochs.epoch(stream, random.Random(3)):
        assert stream.read - len(out) <= k
        out.append(x)
    assert sorted(out) == list(range(N))
    assert all(pos >= x - (k - 1) for pos, x in enumerate(out))
    if k == 1:
        assert out == list(range(N))


def test_an_epoch_exactly_the_size_of_the_budget_fits():
    stream = Stream()
    epochs = Epochs(8, cache_bytes=N * 10, size=lambda x: 10)
    run_epochs(epochs, stream, 2)
    assert stream.passes == 1


# --- batches --------------------------------------------------------------------------------------


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_batches_carry_a_partial_batch_into_the_next_epoch():
    epoch = Stream(5)
    got = take(batches(epoch, 2, "empty"), 5)
    assert got == [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]
    assert epoch.passes == 2  # endless: it reads the epoch again, lazily


def test_batches_larger_than_an_epoch_span_epochs():
    assert take(batches(Stream(3), 5, "empty"), 3) == [
        [0, 1, 2, 0, 1],
        [2, 0, 1, 2, 0],
        [1, 2, 0, 1, 2],
    ]


def test_batches_over_shuffled_epochs_see_every_example_once_per_epoch():
    epochs, rng = Epochs(8, cache_bytes=10_000, size=lambda x: 1), random.Random(0)
    stream = Stream()
    got = take(batches(lambda: epochs.epoch(stream, rng), 10, "empty"), 3 * N // 10)
    flat = [x for b in got for x in b]
    for e in range(3):
        assert sorted(flat[e * N : (e + 1) * N]) == list(range(N))
    assert stream.passes == 1


def test_batches_raise_the_message_on_an_empty_epoch():
    with pytest.raises(RuntimeError, match=r"^rank 1: no training images in 3 shards$"):
        next(batches(Stream(0), 4, "rank 1: no training images in 3 shards"))
    # an epoch that becomes empty later raises too, instead of looping forever
    passes = iter([[1, 2, 3], []])
    it = batches(lambda: next(passes), 2, "ran dry")
    assert next(it) == [1, 2]
    with pytest.raises(RuntimeError, match="ran dry"):
        next(it)
