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


def test_pixel_budget_holds_under_many_threads():
    from mmflow.data.ingest_pool import PixelBudget

    budget, lock, now, peak = PixelBudget(1000), threading.Lock(), [0], [0]

    def work(n):
        with budget.hold(n):
            with lock:
                now[0] += n
                peak[0] = max(peak[0], now[0])
            time.sleep(random.random() / 500)
            with lock:
                now[0] -= n
        return n

    sizes = [random.randint(1, 400) for _ in range(300)] + [1500]  # one larger than the budget
    out = list(run_bounded(sizes, work, threads=32, hard_limit=30))
    assert len(out) == len(sizes)
    assert peak[0] <= 1500 and budget.peak == peak[0] and budget.used == 0
    assert max(n for n in sizes if n <= 1000) < peak[0]  # several at once, not one by one


def test_ingest_decodes_in_flight_stay_within_the_budget(tmp_path, monkeypatch):
    """16 threads, 1-megapixel images, a 3-megapixel budget: never more than 3 Mpx decoded at
    once (measured around the decoder itself), and the images still come out."""
    import io as _io

    import pyarrow as pa
    import pyarrow.parquet as pq

    import mmflow.data.ingest_images as images
    from mmflow.data.ingest_shard import ShardJob, ingest_shard
    from mmflow.data.ingest_sources import shard_input_uri
    from mmflow.stages.ingest_urls import IngestUrlsParams
    from mmflow.storage import Storage
    from tests.data.http_server import LoopbackServer

    lock, now, peak = threading.Lock(), [0], [0]
    real = images._resize

    def resize(img, *a, **k):  # runs while the decoded image is held, after _decode
        n = img.size[0] * img.size[1]
        with lock:
            now[0] += n
            peak[0] = max(peak[0], now[0])
        time.sleep(0.02)
        try:
            return real(img, *a, **k)
        finally:
            with lock:
                now[0] -= n

    monkeypatch.setattr(images, "_resize", resize)
    st, inputs = Storage(), str(tmp_path / "in")
    with LoopbackServer() as s:
        urls = [s.url(f"/img/{i}.jpg?w=1000&h=1000") for i in range(40)]
        buf = _io.BytesIO()
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), buf)
        st.write_atomic(shard_input_uri(inputs, 0), buf.getvalue())
        p = IngestUrlsParams(
            url_list="x",
            samples_per_shard=40,
            image_size=16,
            threads=16,
            resize_mode="no",  # no draft: every image decodes at its full 1 Mpx
            encode_format="png",
            max_pixels_in_flight=3_000_000,
            refuse_private_addresses=False,
        )
        stats = ingest_shard(0, ShardJob(inputs, str(tmp_path / "out"), None, p.shard_config(), st))
    assert stats["successes"] == 40
    assert 1_000_000 <= peak[0] <= 3_000_000, peak[0]
