"""Progress reports: done/total, rate, elapsed and ETA text; as plain lines at most one per
interval and always one at the end; bars shared by workers (tick); the error behind Ray's
wrappers. The console that draws them is tests/test_console.py."""

from __future__ import annotations

import io
import re

import pytest

from mmflow import progress
from mmflow import progress as progress_mod
from mmflow.progress import Progress, brief_error, format_duration, tick


class Clock:
    """time.monotonic for the module under test, moved by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", c)
    return c


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (61, "1m01s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3 * 3600 + 25 * 60 + 59, "3h25m"),
        (-5, "0s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_line_has_counts_rate_elapsed_and_eta(clock):
    out = io.StringIO()
    p = Progress(total=100, desc="shards", unit="shards", interval=5.0, stream=out)
    clock.now += 10.0
    p.update(25, extra="errors 0")
    # 25 in 10 s = 2.5/s; the other 75 take 30 s more
    assert lines(out) == ["[shards] 25/100 shards (25%) 2.5 shards/s elapsed 10s ETA 30s errors 0"]


def test_at_most_one_line_per_interval_and_always_the_last(clock):
    out = io.StringIO()
    p = Progress(total=10, desc="d", interval=5.0, stream=out)
    clock.now += 6.0
    p.update()  # first line
    clock.now += 1.0
    p.update()  # too soon: silent
    clock.now += 1.0
    p.update()
    assert len(lines(out)) == 1 and lines(out)[0].startswith("[d] 1/10 items (10%)")
    clock.now += 5.0
    p.update()  # the interval has passed
    assert lines(out)[-1].startswith("[d] 4/10 items (40%)")
    clock.now += 0.1
    p.update(6)  # done: printed whatever the interval
    assert len(lines(out)) == 3
    assert re.fullmatch(
        r"\[d\] 10/10 items \(100%\) [\d.]+ items/s elapsed 13s ETA 0s", lines(out)[-1]
    )


def test_close_prints_the_final_count_once(clock):
    out = io.StringIO()
    p = Progress(total=50, desc="d", interval=60.0, stream=out)
    clock.now += 61.0
    p.update(5)
    clock.now += 2.0
    p.update(3)  # silent, within the interval
    p.close()  # the last 3 were not shown: one more line
    assert [line.split(" ")[1] for line in lines(out)] == ["5/50", "8/50"]
    p.close()  # nothing new: nothing printed
    assert len(lines(out)) == 2
    p.close(extra="done")  # an extra note always prints
    assert lines(out)[-1].endswith(" done") and len(lines(out)) == 3


def test_eta_unknown_before_any_progress_and_empty_totals(clock):
    out = io.StringIO()
    p = Progress(total=10, desc="d", stream=out)
    clock.now += 7.0
    p.update(0)
    assert lines(out) == ["[d] 0/10 items (0%) 0.00 items/s elapsed 7s ETA ?"]
    empty = Progress(total=0, desc="e", stream=out)
    empty.update(0)  # nothing to do is 100% done
    assert lines(out)[-1].startswith("[e] 0/0 items (100%)")


def test_a_stream_of_its_own_gets_plain_lines_terminal_or_not(clock):
    """A Progress given a stream prints plain lines on it, whatever the stream is: no carriage
    returns or cursor codes (the live display is the console's, for mmflow run)."""
    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        p = Progress(total=3, desc="d", interval=0.0, stream=stream)
        for _ in range(3):
            clock.now += 1.0
            p.update()
        clock.now -= 3.0
    assert tty.getvalue() == log.getvalue()
    assert "\r" not in tty.getvalue() and "\x1b" not in tty.getvalue()
    assert len(lines(tty)) == 3 and tty.getvalue().endswith("\n")


def test_defaults_to_stdout(clock, capsys):
    p = Progress(total=1, desc="std")
    p.update()
    assert capsys.readouterr().out.startswith("[std] 1/1 items (100%)")


def test_rate_leaves_out_what_was_done_before(clock):
    """A resumed run's earlier work counts in done, not in the rate (nor the ETA)."""
    out = io.StringIO()
    p = Progress(total=100, desc="train", unit="steps", interval=0.0, stream=out, initial=60)
    clock.now += 10.0
    p.set(80, extra="loss 0.5")
    assert lines(out) == ["[train] 80/100 steps (80%) 2.0 steps/s elapsed 10s ETA 10s loss 0.5"]


def test_the_end_prints_once_and_each_bar_keeps_its_own_interval(clock):
    out = io.StringIO()
    a = Progress(total=2, desc="a", interval=5.0, stream=out)
    b = Progress(total=2, desc="b", interval=5.0, stream=out)
    a.update()
    b.update()  # another bar: not held back by a's line
    a.update()  # a's end, within its interval: printed
    a.close()  # nothing new since
    assert [line.split(" ")[:2] for line in lines(out)] == [
        ["[a]", "1/2"],
        ["[b]", "1/2"],
        ["[a]", "2/2"],
    ]


def test_tick_moves_the_bar_the_driver_opened(clock, capsys):
    """Workers sharing one bar (the readers of an inference stage) send ticks; the bar of that
    name adds them up, with their counts beside it; a closed bar takes no more."""
    bar = Progress(total=4, desc="filter", unit="shards", interval=0.0)
    tick("filter", 1, rows=100, bad=1)
    tick("filter", 2, rows=150, bad=0)
    tick("elsewhere", 1)  # nobody opened it: ignored
    assert bar.done == 3 and bar.counts == {"rows": 250, "bad": 1}
    assert capsys.readouterr().out.splitlines()[-1].startswith("[filter] 3/4 shards (75%)")
    clock.now += 1.0
    bar.close()
    assert capsys.readouterr().out == ""  # its last line is already out
    tick("filter", 1)
    assert bar.done == 3


def test_marked_lines_decode_and_others_do_not():
    line = progress.MARK + '{"kind": "line", "text": "hi"}'
    assert progress.decode(line) == {"kind": "line", "text": "hi"}
    assert progress.decode("(pid=12) " + line) == {"kind": "line", "text": "hi"}
    for other in ("[train] step 1", progress.MARK + "not json", progress.MARK + '["kind"]'):
        assert progress.decode(other) is None


def test_the_driver_waits_for_a_workers_sync_line_where_it_reads_them(monkeypatch, capsys):
    import threading
    import time

    progress.send_sync("fit-1")  # what a worker writes last
    assert progress.decode(capsys.readouterr().out) == {"kind": "sync", "token": "fit-1"}
    monkeypatch.setattr(progress, "listening", False)
    assert progress.wait_for_sync("fit-1", timeout=5) is False  # no console reads: no wait
    monkeypatch.setattr(progress, "listening", True)
    threading.Timer(0.3, progress.synced, ["fit-1"]).start()  # Ray's log thread, later
    t0 = time.monotonic()
    assert progress.wait_for_sync("fit-1", timeout=5) is True
    assert 0.2 < time.monotonic() - t0 < 4
    t0 = time.monotonic()
    assert progress.wait_for_sync("never", timeout=0.3) is False  # a lost line: not forever
    assert time.monotonic() - t0 < 2


def test_brief_error_is_the_first_error_without_ray_tracebacks(ray_session):
    @ray_session.remote(num_cpus=0, max_retries=0)
    def fails():
        raise ValueError("no pictures in shard 3")

    with pytest.raises(Exception) as raised:
        ray_session.get(fails.remote())
    assert '  File "' in str(raised.value)  # Ray's message carries the remote traceback
    assert brief_error(raised.value) == "ValueError: no pictures in shard 3"
    from ray.train import WorkerGroupError

    group = WorkerGroupError("rank 1 failed", {1: KeyError("x"), 0: OSError("disk full")})
    assert brief_error(group) == "OSError: disk full"
    assert (
        brief_error(RuntimeError("stage wrote no output")) == "RuntimeError: stage wrote no output"
    )
    assert brief_error(KeyboardInterrupt()) == "KeyboardInterrupt"
    written = RuntimeError('ray::f() (pid=1)\n  File "x.py", line 1, in f\nOSError: disk full')
    assert brief_error(written) == "RuntimeError: OSError: disk full"
