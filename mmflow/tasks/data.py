"""What a training task reads: its rank's share of the shards, one pass of training samples
through a pipeline of explicit steps, and the held-out set; every sample it cannot use is
counted by reason, never silently dropped.

The steps, in order, for each sample of a shard:

1. rank assignment (:func:`assign`): whole shards per rank, or every ``world``-th sample of
   each shard when there are fewer shards than ranks;
2. the held-out split by key (:func:`mmflow.data.holdout.is_held_out`): training reads the
   samples not held out, the held-out set the others;
3. defects reported by :func:`mmflow.data.webdataset_io.iter_shard` (``s.error``:
   ``missing_image``, ``corrupt_json``, ``corrupt_caption``, ``corrupt_tar`` ...), skipped as
   that kind;
4. an empty caption, for tasks that need one (``empty_caption``);
5. the image decoded to RGB by PIL (``undecodable_image`` when it cannot be);
6. the task's own ``prepare(sample, image)`` (transforms, tokenizer); a failure here is a bug,
   and raises.

Steps 1 and 2 choose samples; they are not skips. Every sample that passes them is *seen*;
steps 3-5 skip some of those (:class:`SkipCounter`). The shuffle buffer and the replay of
later epochs from memory stay in :class:`mmflow.train.epochs.Epochs`. :class:`ShardData` is
what a task owns: the settings from its stage's params, the epochs, and the two counters
(training, and ``heldout_`` for the held-out set). No torch here.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from mmflow.data.holdout import is_held_out
from mmflow.data.webdataset_io import Sample, iter_shard
from mmflow.storage import Storage
from mmflow.train.epochs import Epochs

T = TypeVar("T")
Prepare = Callable[[Sample, Any], T]  # (sample, PIL RGB image) -> example


@dataclass(frozen=True)
class RankShare:
    """One rank's part of a shard list: the shards it reads, and which of their samples."""

    shards: list[str]
    rank: int
    world: int
    by_shard: bool  # whole shards; otherwise every world-th sample of every shard

    def takes(self, index: int) -> bool:
        """Whether this rank reads the sample at ``index`` (its position in its shard)."""
        return self.by_shard or index % self.world == self.rank


def assign(shards: list[str], rank: int, world: int) -> RankShare:
    """Shards ``rank, rank + world, ...`` when every rank gets at least one; with fewer shards
    than ranks, every rank reads all shards and keeps every ``world``-th sample."""
    if len(shards) >= world:
        return RankShare(shards[rank::world], rank, world, by_shard=True)
    return RankShare(list(shards), rank, world, by_shard=False)


class SkipCounter:
    """Samples seen and samples skipped, by reason, over the first pass of a stream.

    Later passes read the same samples again (unless they are replayed from memory), so
    only the first pass counts: the figures describe the data, not the number of epochs.
    ``prefix`` names the counts (``heldout_`` for the held-out set)."""

    def __init__(self, prefix: str = ""):
        self.prefix, self.seen, self.skipped = prefix, 0, Counter()
        self.done = False  # a whole pass was counted

    def see(self) -> None:
        if not self.done:
            self.seen += 1

    def skip(self, reason: str) -> None:
        if not self.done:
            self.skipped[reason] += 1

    def pass_done(self) -> None:
        self.done = True

    def counts(self) -> dict[str, int]:
        """``{prefix}samples_seen`` and ``{prefix}skipped_<reason>`` for each reason seen."""
        out = {f"{self.prefix}samples_seen": self.seen}
        out.update({f"{self.prefix}skipped_{r}": n for r, n in sorted(self.skipped.items())})
        return out


def error_kind(error: str) -> str:
    """``corrupt_tar: OSError: ...`` -> ``corrupt_tar``: the kind, without the details."""
    return error.split(":", 1)[0].strip() or "corrupt_sample"


def open_rgb(data: bytes):
    """The image in ``data`` decoded to RGB (PIL); raises when it cannot be."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


_SKIPPED = object()


def _usable(s: Sample, prepare: Prepare, counter: SkipCounter, require_caption: bool) -> Any:
    """Steps 3-6 for one seen sample: its example, or ``_SKIPPED`` (counted)."""
    counter.see()
    if s.error:
        counter.skip(error_kind(s.error))
        return _SKIPPED
    if require_caption and not (s.caption or "").strip():
        counter.skip("empty_caption")
        return _SKIPPED
    try:
        image = open_rgb(s.image)
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        counter.skip("undecodable_image")
        return _SKIPPED
    return prepare(s, image)


def train_stream(
    shards: list[str],
    rank: int,
    world: int,
    rng: random.Random,
    *,
    holdout_fraction: float,
    prepare: Prepare,
    counter: SkipCounter,
    require_caption: bool = False,
    storage: Storage | None = None,
) -> Iterator[T]:
    """One pass over this rank's training samples, its shards in an order drawn from ``rng``
    (one ``rng.sample`` call, before anything else is drawn), as ``prepare``'s examples."""
    storage, share = storage or Storage(), assign(shards, rank, world)
    for uri in rng.sample(share.shards, len(share.shards)):
        for s in iter_shard(storage, uri):
            if not share.takes(s.index) or is_held_out(s.key, holdout_fraction):
                continue
            example = _usable(s, prepare, counter, require_caption)
            if example is not _SKIPPED:
                yield example
    counter.pass_done()


def load_heldout(
    shards: list[str],
    *,
    holdout_fraction: float,
    limit: int,
    prepare: Prepare,
    counter: SkipCounter,
    require_caption: bool = False,
    storage: Storage | None = None,
) -> list[T]:
    """Up to ``limit`` held-out examples, the first ones in shard order (the same on every run
    and for any number of ranks); a task loads them once and keeps them."""
    storage, out = storage or Storage(), []
    if limit <= 0:
        return out
    for uri in shards:
        for s in iter_shard(storage, uri):
            if not is_held_out(s.key, holdout_fraction):
                continue
            example = _usable(s, prepare, counter, require_caption)
            if example is not _SKIPPED:
                out.append(example)
                if len(out) >= limit:
                    counter.pass_done()
                    return out
    counter.pass_done()
    return out


class ShardData:
    """A training task's data: its shards and the settings a training stage's params give
    (``holdout_fraction``, ``eval_samples``, ``shuffle_buffer``, ``cache_mb``), its epochs, and
    what its loaders counted. Pickled to each worker with the task; the state lives per process.
    """

    FIELDS = ("holdout_fraction", "eval_samples", "shuffle_buffer", "cache_mb")

    def __init__(
        self,
        shards: list[str],
        *,
        holdout_fraction: float,
        eval_samples: int,
        shuffle_buffer: int,
        cache_mb: int,
    ):
        self.shards, self.holdout_fraction, self.eval_samples = (
            shards,
            holdout_fraction,
            eval_samples,
        )
        self.shuffle_buffer, self.cache_mb = shuffle_buffer, cache_mb
        self.skips, self.heldout_skips = SkipCounter(), SkipCounter("heldout_")
        self.epochs: Epochs | None = None

    @classmethod
    def from_params(cls, shards: list[str], params: Any) -> ShardData:
        """From any object with the four settings as attributes (a training stage's Params)."""
        return cls(shards, **{name: getattr(params, name) for name in cls.FIELDS})

    def epoch(
        self,
        rank: int,
        world: int,
        rng: random.Random,
        prepare: Prepare,
        size: Callable[[Any], int],
        cache: bool = True,
        require_caption: bool = False,
    ) -> Iterator[T]:
        """One epoch of this rank's examples through the shuffle buffer; once one was seen whole
        and fit ``cache_mb`` (``size(example)`` bytes each; never without ``cache``), later ones
        are replayed from memory in a fresh order."""
        if self.epochs is None:
            budget = self.cache_mb << 20 if cache else 0
            self.epochs = Epochs(self.shuffle_buffer, budget, size)
        stream = lambda: train_stream(  # noqa: E731
            self.shards, rank, world, rng, holdout_fraction=self.holdout_fraction,
            prepare=prepare, counter=self.skips, require_caption=require_caption,
        )  # fmt: skip
        return self.epochs.epoch(stream, rng)

    def heldout(self, prepare: Prepare, require_caption: bool = False) -> list[T]:
        """Up to ``eval_samples`` held-out examples (:func:`load_heldout`); the task keeps them."""
        return load_heldout(
            self.shards, holdout_fraction=self.holdout_fraction, limit=self.eval_samples,
            prepare=prepare, counter=self.heldout_skips, require_caption=require_caption,
        )  # fmt: skip

    def counters(self) -> dict[str, int]:
        """What the loaders counted (this process): for ``TrainTask.data_counters``."""
        return {**self.skips.counts(), **self.heldout_skips.counts()}


def prefetched(batches: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``batches`` made ``depth`` ahead in a thread, so building the next batch (Python work,
    mostly) overlaps the training step (torch releases the GIL while it computes). An error in
    the thread is raised here, in the consumer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def fill() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=fill, name="mmflow-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
