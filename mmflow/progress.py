"""Progress lines for long work: done/total, rate and ETA.

Plain ``print`` with flush, at most one line every ``interval`` seconds, so it
reads the same in a terminal and in a Ray job log (no carriage returns).
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class Progress:
    def __init__(
        self, total: int, desc: str, unit: str = "items", interval: float = 5.0, stream=None
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval = interval
        self.stream = stream or sys.stdout
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._printed_done = -1

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self._print(now, extra)

    def _print(self, now: float, extra: str) -> None:
        self._printed_done = self.done
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = format_duration(eta) if eta != float("inf") else "?"
        tail = f" {extra}" if extra else ""
        line = (
            f"[{self.desc}] {self.done}/{self.total} {self.unit} ({pct:.0f}%) "
            f"{rate:.1f} {self.unit}/s elapsed {format_duration(elapsed)} ETA {eta_s}{tail}"
        )
        print(line, file=self.stream, flush=True)

    def close(self, extra: str = "") -> None:
        if self._printed_done != self.done or extra:
            self._print(time.monotonic(), extra)
