"""Progress lines: done/total, rate, elapsed and ETA text; at most one line per interval and
always one at the end; the same plain lines on a terminal as in a log file."""

from __future__ import annotations

import io
import re

import pytest

from mmflow import progress as progress_mod
from mmflow.progress import Progress, format_duration


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
    assert lines(out) == ["[d] 0/10 items (0%) 0.0 items/s elapsed 7s ETA ?"]
    empty = Progress(total=0, desc="e", stream=out)
    empty.update(0)  # nothing to do is 100% done
    assert lines(out)[-1].startswith("[e] 0/0 items (100%)")


def test_a_terminal_gets_the_same_plain_lines_as_a_log(clock):
    """No carriage returns or cursor codes on a TTY: a Ray job log shows exactly what a
    terminal shows, one line per report."""
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
