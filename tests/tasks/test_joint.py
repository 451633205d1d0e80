"""JointTask's training rows: read once from the Ray Data shard, then replayed from memory (or
streamed again when they do not fit), every row once per epoch in a fresh order."""

import numpy as np
import pytest

from mmflow.generate.sampling import SamplingConfig
from mmflow.models.joint import JointVocab, joint_config
from mmflow.stages.joint_train import JointTrainConfig, _share_fits
from mmflow.tasks.joint import JointTask
from mmflow.tasks.joint_eval import JointEvalSet

ROWS, BATCH = 40, 8
VOCAB = JointVocab(text_vocab=32, codebook_size=16, image_tokens=4, max_text_len=3)


class CountingShard:
    """A real Ray Data iterator that counts its epochs (the calls of ``iter_batches``)."""

    def __init__(self, iterator):
        self.iterator, self.reads = iterator, 0

    def iter_batches(self, **kw):
        self.reads += 1
        return self.iterator.iter_batches(**kw)


@pytest.fixture
def shard(ray_session):
    import ray

    # row i's picture starts with codes i // 16, i % 16: every sequence names its row
    items = [
        {"text_ids": np.arange(1 + i % 3, dtype=np.int32),
         "image_tokens": np.array([i // 16, i % 16, 0, 0], dtype=np.int32)}
        for i in range(ROWS)
    ]  # fmt: skip
    return CountingShard(ray.data.from_items(items, override_num_blocks=3).iterator())


def task(replay: bool) -> JointTask:
    return JointTask(
        cfg=joint_config("joint-tiny"), vocab=VOCAB,
        train=JointTrainConfig(batch_size=BATCH, seed=3), i2t_share=0.5, cond_dropout=0.5,
        loss_weights={"text": 1.0, "image": 1.0}, shuffle_buffer=16, sampling=SamplingConfig(),
        eval_set=JointEvalSet(), vqgan_uri="", tokenizer_json="", save_meta={}, replay_rows=replay,
    )  # fmt: skip


def rows_of(batch) -> list[int]:
    lo, hi = VOCAB.image_range
    out = []
    for seq in batch["inputs"].tolist():
        codes = [t - lo for t in seq if lo <= t < hi]
        out.append(16 * codes[0] + codes[1])
    return out


@pytest.mark.parametrize("replay", [True, False])
def test_every_row_once_per_epoch_read_once_when_replayed(shard, replay):
    batches = task(replay)._batches(shard, rank=0, start_step=0)
    epochs = 3
    seen = [r for _ in range(epochs * ROWS // BATCH) for r in rows_of(next(batches))]
    orders = [seen[e * ROWS : (e + 1) * ROWS] for e in range(epochs)]
    assert all(sorted(order) == list(range(ROWS)) for order in orders)
    assert len({tuple(order) for order in orders}) == epochs  # a fresh order every epoch
    assert shard.reads == (1 if replay else epochs)


def test_both_directions_and_the_step_travel_with_the_batches(shard):
    batches = task(True)._batches(shard, rank=0, start_step=5)
    first = [next(batches) for _ in range(10)]
    heads = {t for b in first for t in b["inputs"][:, 0].tolist()}
    assert heads == {VOCAB.t2i, VOCAB.i2t}
    assert [b["step"] for b in first] == list(range(5, 15))


def test_a_share_fits_the_cache_when_its_rows_do():
    # 500 rows a worker, 100 tokens a row: about 2.1 MB as Python lists
    assert not _share_fits(1000, 2, 100, cache_mb=1)
    assert _share_fits(1000, 2, 100, cache_mb=3)
    assert _share_fits(1000, 8, 100, cache_mb=1)  # 125 rows a worker
    assert not _share_fits(10, 1, 100, cache_mb=0)  # 0: every epoch streamed
