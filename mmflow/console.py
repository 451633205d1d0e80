"""The console of ``mmflow run``: what the driver shows of a run, and nothing of Ray's own.

On a terminal, a live display (rich): one bar per running stage with the figures of its
latest :class:`mmflow.progress.Progress` (done/total, rate, ETA, the stage's counts), whether
that runs in the driver or in a Ray worker; every line printed above it; one summary line per
finished stage. Anywhere else (a Ray job log, a pipe, a file) the same reports as plain lines,
without escape codes (:class:`mmflow.progress.PlainSink`).

``mmflow.ray_env`` keeps Ray's output off the console while one is installed: worker
output, Ray's and its libraries' loggers and Python warnings go to Ray's log files and to
``mmflow-driver.log`` beside them (the console says where), unless ``verbose``. What native
code writes straight to the process's file descriptor 2 (Ray's core worker in the driver logs
its own warnings that way, past every Python logger) goes to ``native_log`` while the console
is entered, unless ``verbose``; Python's ``sys.stderr`` stays on the terminal.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from typing import Any

from mmflow import progress
from mmflow.progress import PlainSink, counts_text


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


class Console:
    """This process's sink for progress reports while it is entered (``with Console():``).

    ``live`` (default: whether ``stream`` is a terminal) draws rich bars; otherwise plain lines.
    ``verbose`` lets Ray's own output through (``mmflow.ray_env``)."""

    def __init__(self, verbose: bool = False, live: bool | None = None, stream=None):
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.log_file: str | None = None  # where Ray's driver-side output went (ray_env)
        self.native_log: str | None = None  # where fd 2 went (native code's own writes)
        self._saved_stderr: tuple[Any, int] | None = None
        self._plain = PlainSink(self.stream)
        self._bars = None
        self._tasks: dict[str, Any] = {}  # stage (or bar outside a stage) -> rich task id
        self._stage: str | None = None
        self._lock = threading.Lock()

    # ---- entering ---------------------------------------------------------------------------
    def __enter__(self) -> Console:
        self._previous = progress.install(self)
        if not self.verbose:  # MLflow's notes as it sets up its database, before Ray starts
            os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
            self._native_stderr_off()
        if self.live:
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            self._bars = Bars(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=24),
                TextColumn("{task.fields[info]}", markup=False),
                TimeElapsedColumn(),
                console=RichConsole(file=self.stream, force_terminal=True, soft_wrap=True),
                redirect_stdout=self.stream is sys.stdout,
                redirect_stderr=self.stream is sys.stdout,
                refresh_per_second=4,
            )
            self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            for task in list(self._tasks.values()):
                self._bars.remove_task(task)
            self._tasks.clear()
            self._bars.stop()
            self._bars = None
        # kept for a failure (the CLI names the file); a stop (Ctrl-C, or the SystemExit Ray's
        # SIGTERM handler raises when `ray job stop` ends a driver) is no failure to look into
        self._native_stderr_back(keep=exc[0] is not None and issubclass(exc[0], Exception))
        progress.install(self._previous)

    def _native_stderr_off(self) -> None:
        """fd 2 into a file, ``sys.stderr`` on a copy of the terminal's descriptor. Only where
        ``sys.stderr`` is still the process's own on fd 2 (a CLI run; not a test capturing
        output), so nothing that wraps it is left writing into the file."""
        if sys.stderr is not sys.__stderr__:
            return
        try:
            if sys.stderr.fileno() != 2:
                return
            sys.stderr.flush()
            path = os.path.join(tempfile.gettempdir(), f"mmflow-native-{os.getpid()}.log")
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except (OSError, ValueError, AttributeError):  # no real fd 2; no temporary folder
            return
        terminal = os.dup(2)
        os.dup2(target, 2)
        os.close(target)
        self._saved_stderr = (sys.stderr, terminal)
        sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1,
                               encoding=sys.__stderr__.encoding, errors="backslashreplace")  # fmt: skip
        self.native_log = path

    def _native_stderr_back(self, keep: bool) -> None:
        """fd 2 back to the terminal. The file is kept only when it holds something and the
        block ended in an error (the CLI names it then); after a clean run or a stop it goes, so
        runs do not pile files up in the temporary folder."""
        if self._saved_stderr is None:
            return
        original, terminal = self._saved_stderr
        self._saved_stderr = None
        sys.stderr.flush()
        replacement, sys.stderr = sys.stderr, original
        replacement.close()
        os.dup2(terminal, 2)
        os.close(terminal)
        path = self.native_log
        if path and os.path.exists(path) and (not keep or os.path.getsize(path) == 0):
            os.remove(path)
            self.native_log = None

    # ---- the sink ---------------------------------------------------------------------------
    def line(self, text: str, style: str | None = None) -> None:
        if self._bars is None:
            self._plain.line(text)
        else:
            self._bars.console.print(
                text, style=style, markup=False, highlight=False, soft_wrap=True
            )

    def progress(self, state: dict[str, Any]) -> None:
        if self._bars is None:
            self._plain.progress(state)
            return
        with self._lock:
            key = self._stage or state["desc"]
            if key not in self._tasks:
                self._tasks[key] = self._bars.add_task(key, total=None, info="")
            prefix = "" if state["desc"] == key else f"{state['desc']}: "
            info = prefix + counts_text(state, elapsed=False)
            self._bars.update(
                self._tasks[key], total=state["total"], completed=state["done"], info=info
            )
            if self._stage is None and (state.get("final") or state["done"] >= state["total"]):
                self._bars.remove_task(self._tasks.pop(key))
                self._bars.refresh()  # a line printed next redraws the bars as last drawn
                self.line(progress.progress_line(state))

    def stage_begin(self, name: str, text: str) -> None:
        self.line(text)
        with self._lock:
            self._stage = name
            if self._bars is not None and name not in self._tasks:
                self._tasks[name] = self._bars.add_task(name, total=None, info="running")

    def stage_end(self, name: str, text: str, ok: bool = True) -> None:
        with self._lock:
            if self._stage == name:
                self._stage = None
            task = self._tasks.pop(name, None)
            if task is not None and self._bars is not None:
                self._bars.refresh()  # its last state drawn once, however soon the end came
                self._bars.remove_task(task)
                self._bars.refresh()  # a line printed next redraws the bars as last drawn
        self.line(text, style=None if ok else "bold red")

    # ---- from Ray's log stream (mmflow.ray_env) ---------------------------------------------
    def worker_message(self, message: dict[str, Any]) -> None:
        """A worker's marked line, decoded (:func:`mmflow.progress.decode`)."""
        if message["kind"] == "progress" and isinstance(message.get("state"), dict):
            self.progress(message["state"])
        elif message["kind"] == "line":
            self.line(str(message.get("text", "")))
        elif message["kind"] == "tick":
            counts = message.get("counts") or {}
            progress.tick(str(message.get("desc")), int(message.get("n", 1)), **counts)
