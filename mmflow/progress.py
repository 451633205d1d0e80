"""What a user sees of long work: progress (done/total, rate, ETA), lines, stage start and end.

Code reports through :class:`Progress`, :func:`say`, :func:`stage_begin` and
:func:`stage_end`, wherever it runs; where the report goes depends on the process:

- in the driver of ``mmflow run``, to the console installed with :func:`install`
  (``mmflow.console``: a live display on a terminal, plain lines in a log);
- in a Ray worker, as a marked line on stdout (``@mmflow {json}``). Ray carries worker
  output to the driver, whose console takes the marked lines out of Ray's stream
  (``mmflow.ray_env``) and shows them as its own; the rest of Ray's output stays in Ray's
  log files;
- anywhere else (a script, a test), as plain lines on stdout, one every ``interval`` seconds
  at most and always the last one.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from typing import Any, Protocol

MARK = "@mmflow "  # a worker's line for the driver's console
WIRE_INTERVAL_S = 1.0  # a worker's progress, at most once a second per bar


class Sink(Protocol):
    """Where reports go: the driver's console (``mmflow.console.Console``) or a plain stream."""

    verbose: bool

    def progress(self, state: dict[str, Any]) -> None: ...
    def line(self, text: str) -> None: ...
    def stage_begin(self, name: str, text: str) -> None: ...
    def stage_end(self, name: str, text: str, ok: bool) -> None: ...


_sink: Sink | None = None


def install(sink: Sink | None) -> Sink | None:
    """Make ``sink`` this process's console (None: none); returns the one it replaces."""
    global _sink
    old, _sink = _sink, sink
    return old


def installed() -> Sink | None:
    return _sink


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


def counts_text(state: dict[str, Any], elapsed: bool = True) -> str:
    """``25/100 shards (25%) 2.5 shards/s elapsed 10s ETA 30s errors 0``: one bar's figures."""
    done, total, unit = state["done"], state["total"], state["unit"]
    pct = 100.0 * done / total if total else 100.0
    rate = state["rate"]
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    if done >= total:
        eta = "0s"
    tail = f" {state['extra']}" if state.get("extra") else ""
    return (
        f"{done}/{total} {unit} ({pct:.0f}%) {format_rate(rate)} {unit}/s "
        + (f"elapsed {format_duration(state['elapsed'])} " if elapsed else "")
        + f"ETA {eta}{tail}"
    )


def progress_line(state: dict[str, Any]) -> str:
    return f"[{state['desc']}] {counts_text(state)}"


class PlainSink:
    """Plain lines on a stream: what a Ray job log, a pipe or a script without a console gets.
    A bar prints at most every ``interval`` seconds, and always when it ends."""

    verbose = False

    def __init__(self, stream=None, interval: float = 5.0):
        self.stream, self.interval = stream, interval
        self._last: dict[str, tuple[float, int, str]] = {}  # bar -> time, done, extra printed
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream or sys.stdout, flush=True)

    def progress(self, state: dict[str, Any]) -> None:
        key, now = state["desc"], time.monotonic()
        printed_at, printed_done, printed_extra = self._last.get(key, (None, -1, ""))
        if state.get("final"):
            due = (printed_done, printed_extra) != (state["done"], state.get("extra", ""))
        else:
            due = printed_at is None or now - printed_at >= self.interval
            due = due or state["done"] >= state["total"] > printed_done
        if due:
            self._last[key] = (now, state["done"], state.get("extra", ""))
            self._print(progress_line(state))

    def line(self, text: str) -> None:
        self._print(text)

    def stage_begin(self, name: str, text: str) -> None:
        self._print(text)

    def stage_end(self, name: str, text: str, ok: bool) -> None:
        self._print(text)


class WireSink:
    """A Ray worker's reports as marked lines on stdout, for the driver's console. Written
    with ``sys.stdout.write``: Ray Train turns ``print`` into a logger that echoes each line
    to both stdout and stderr."""

    verbose = False

    def __init__(self):
        self._last: dict[str, float] = {}

    def _send(self, kind: str, payload: dict[str, Any]) -> None:
        sys.stdout.write(MARK + json.dumps({"kind": kind, **payload}) + "\n")
        sys.stdout.flush()

    def progress(self, state: dict[str, Any]) -> None:
        now = time.monotonic()
        last = self._last.get(state["desc"])
        ending = state.get("final") or state["done"] >= state["total"]
        if ending or last is None or now - last >= WIRE_INTERVAL_S:
            self._last[state["desc"]] = now
            self._send("progress", {"state": state})

    def line(self, text: str) -> None:
        self._send("line", {"text": text})

    def stage_begin(self, name: str, text: str) -> None:
        self.line(text)

    def stage_end(self, name: str, text: str, ok: bool) -> None:
        self.line(text)

    def tick(self, desc: str, n: int, counts: dict[str, int]) -> None:
        self._send("tick", {"desc": desc, "n": n, "counts": counts})


def decode(line: str) -> dict[str, Any] | None:
    """A worker's marked line as ``{"kind": "progress", "state": ...}`` or ``{"kind": "line",
    "text": ...}``; None for any other line."""
    at = line.find(MARK)
    if at < 0:
        return None
    try:
        message = json.loads(line[at + len(MARK) :])
    except ValueError:
        return None
    return message if isinstance(message, dict) and "kind" in message else None


# A worker's output reaches the driver by Ray tailing its log file, a task's result directly:
# a stage whose task has returned may still have its last lines on the way. A worker ends
# with a sync line (``send_sync``); the driver waits for it (``wait_for_sync``) where its
# console reads the workers' lines (``listening``, set by mmflow.ray_env).
_synced: set[str] = set()
_sync_seen = threading.Condition()
listening = False


def send_sync(token: str) -> None:
    """In a worker: a marked line after everything it printed before."""
    sys.stdout.write(MARK + json.dumps({"kind": "sync", "token": token}) + "\n")
    sys.stdout.flush()


def synced(token: str) -> None:
    """In the driver: a worker's sync line arrived."""
    with _sync_seen:
        _synced.add(token)
        _sync_seen.notify_all()


def wait_for_sync(token: str, timeout: float = 10.0) -> bool:
    """In the driver: wait until the worker's lines up to its sync line have been shown
    (at most ``timeout`` seconds; at once where no console reads them)."""
    with _sync_seen:
        if listening:
            _sync_seen.wait_for(lambda: token in _synced, timeout)
        found = token in _synced
        _synced.discard(token)
        return found


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (its stdout goes to Ray's log files)."""
    if "ray" not in sys.modules:
        return False
    try:
        from ray._private.worker import WORKER_MODE, global_worker
    except ImportError:  # Ray moved it: plain lines, as without Ray
        return False
    return getattr(global_worker, "mode", None) == WORKER_MODE


_plain = PlainSink()
_wire = WireSink()
_open: dict[str, Progress] = {}  # bars by name, for tick()


def current() -> Sink:
    """This process's sink: the installed console, a worker's wire, or plain stdout."""
    if _sink is not None:
        return _sink
    return _wire if in_ray_worker() else _plain


def tick(desc: str, n: int = 1, **counts: int) -> None:
    """``n`` more done on the bar ``desc`` that the driver opened (a :class:`Progress`), and
    ``counts`` added to its running totals (``rows 1200 bad 3``): how many workers share one
    bar. A bar nobody opened ignores it."""
    if _sink is None and in_ray_worker():
        _wire.tick(desc, n, counts)
        return
    bar = _open.get(desc)
    if bar is not None:
        bar.add(n, counts)


def say(text: str) -> None:
    """One line for the user, now (above the live display on a terminal)."""
    current().line(text)


def stage_begin(name: str, text: str) -> None:
    """A stage starts: its line, and on a terminal its own bar until :func:`stage_end`."""
    current().stage_begin(name, text)


def stage_end(name: str, text: str, ok: bool = True) -> None:
    """A stage ends: its bar goes and ``text`` (its summary) stays."""
    current().stage_end(name, text, ok)


class Progress:
    """Done/total of one piece of work, with rate and ETA, to this process's sink.

    ``initial`` is work done before (a resumed run): counted in done, not in the rate. With
    ``stream`` (and ``interval``) the lines go there, plain, whatever the process has."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "items",
        interval: float | None = None,
        stream=None,
        initial: int = 0,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.initial = self.done = initial
        self.start = time.monotonic()
        own = stream is not None or interval is not None
        self._sink = PlainSink(stream, 5.0 if interval is None else interval) if own else None
        self.counts: dict[str, int] = {}
        _open[desc] = self  # for tick()

    def state(self, extra: str = "", final: bool = False) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return {
            "desc": self.desc,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "elapsed": elapsed,
            "rate": (self.done - self.initial) / elapsed,
            "extra": extra,
            "final": final,
        }

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        (self._sink or current()).progress(self.state(extra))

    def set(self, done: int, extra: str = "") -> None:
        self.update(done - self.done, extra)

    def add(self, n: int, counts: dict[str, int]) -> None:
        """``n`` more done, and ``counts`` added to the totals shown beside the bar."""
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.update(n, self._counts_text())

    def _counts_text(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.counts.items())

    def close(self, extra: str = "") -> None:
        if _open.get(self.desc) is self:
            del _open[self.desc]
        extra = extra or self._counts_text()
        (self._sink or current()).progress(self.state(extra, final=True))


def brief_error(exc: BaseException) -> str:
    """``Type: message`` of the error behind ``exc``: through Ray's wrappers (a task's or an
    actor's error, Ray Train's worker and controller failures) to the error first raised, and
    without the remote traceback Ray writes into its messages (that one is in the logs)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = None
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            inner = failures[min(failures)]
        elif isinstance(getattr(exc, "controller_failure", None), BaseException):
            inner = exc.controller_failure
        elif type(exc).__module__.startswith("ray."):
            cause = getattr(exc, "cause", None)
            inner = cause if isinstance(cause, BaseException) else exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "Traceback (most recent call last)" in text or '\n  File "' in text:
        # a traceback written into the message (an error Ray could not rebuild): its last line
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = text.split(": ", 1)[1] if text.startswith(type(exc).__name__ + ": ") else text
    text = text.strip()
    name = type(exc).__name__
    if name.startswith("RayTaskError(") and name.endswith(")"):
        name = name[len("RayTaskError(") : -1]
    return f"{name}: {text}" if text else name
