"""The console of ``mmflow run``: a live display on a terminal, plain lines elsewhere, and
nothing of Ray's own output unless ``--verbose``.

The end-to-end tests run ``mmflow run`` in a subprocess: under a pseudo-terminal on its own
local Ray (the quickstart's way) with a DeepSpeed training stage, where most of Ray's and
DeepSpeed's chatter comes from; and piped, joined to the session's Ray (a Ray job's way)."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time

import pytest

from mmflow import progress
from mmflow.console import Console
from mmflow.data.shards import map_shards
from mmflow.progress import Progress, say, stage_begin, stage_end
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.train.config import TrainTask
from tests.conftest import MMFLOW, pipeline_yaml, run_cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# What Ray, Ray Train, Ray Data and DeepSpeed print on their own (see the issue): none of it
# may reach the console of a successful run.
CHATTER = re.compile(
    r"Traceback|WARNING|Warning|\(raylet\)|\(pid=|pid=\d+\)|TrainController|RayTrainWorker"
    r"|Reporting training result|Token authentication|Setting accelerator|Running Dataset"
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---- stages for the runs ----------------------------------------------------------------------


class TinyParams(Params):
    max_steps: int = 24


class LinearTask(TrainTask):
    """y = 3x on one weight: DeepSpeed ZeRO-2 on one CPU worker, a few steps."""

    def build_model(self):
        from torch import nn

        return nn.Linear(1, 1)

    def train_batches(self, rank, world_size, start_step):
        import torch

        gen = torch.Generator().manual_seed(rank)
        while True:
            x = torch.randn(8, 1, generator=gen)
            yield {"x": x, "y": 3 * x}

    def loss(self, model, batch):
        from torch import nn

        return nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}


@register
class TinyDeepSpeed(Stage):
    type = "tiny_deepspeed"
    Params = TinyParams
    outputs = {"model": "model"}
    resources = Resources(cpus=1, workers=1)

    def run(self, ctx: StageContext) -> None:
        from mmflow.train import TrainConfig, fit

        cfg = TrainConfig(
            strategy="deepspeed", max_steps=ctx.params.max_steps, batch_size=8, lr=0.05,
            warmup_steps=0, checkpoint_every=0, log_every=4, max_failures=0,
        )  # fmt: skip
        final = fit(LinearTask(), cfg, ctx, model_output=None)
        ctx.storage.write_json(f"{ctx.outputs['model']}/final.json", final)
        ctx.log_metrics({"steps": final["step"]})


def _fail(shard: int) -> dict:
    raise ValueError(f"no pictures in shard {shard}")


@register
class Broken(Stage):
    type = "broken"
    outputs = {"shards": "shards"}
    resources = Resources(cpus=1, workers=0)

    def run(self, ctx: StageContext) -> None:
        map_shards(_fail, [0], ctx.outputs["shards"], desc=ctx.stage, storage=ctx.storage)


SYNTH = """
synth:
  type: synth_shapes
  params: {num_samples: 200, samples_per_shard: 128, image_size: 16}
"""


def run_in_terminal(args: list[str], cwd: str, timeout: float = 400) -> tuple[int, str]:
    """``mmflow ARGS`` with a pseudo-terminal as stdin, stdout and stderr, as a user's shell
    runs it; its own local Ray (no RAY_ADDRESS). Returns (exit status, everything it wrote)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TERM="xterm-256color", COLUMNS="120", LINES="40")
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [*MMFLOW, *args], cwd=cwd, env=env, stdin=child, stdout=child, stderr=child
    )
    os.close(child)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the child's side closed: it ended
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            raise TimeoutError(f"mmflow {' '.join(args)} ran past {timeout}s:\n{out[-3000:]!r}")
        return proc.wait(timeout=60), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)


def screen_lines(raw: str) -> list[str]:
    """What stays on the screen: escape codes out, each line as its last redraw left it."""
    text = ANSI.sub("", raw).replace("\r\n", "\n")
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


# ---- the Console object -----------------------------------------------------------------------


def test_plain_console_prints_lines_and_no_escape_codes():
    out = io.StringIO()
    with Console(stream=out) as console:
        assert not console.live and progress.installed() is console
        stage_begin("synth", "[mmflow] synth: running")
        bar = Progress(4, "synth", unit="samples")
        bar.update(4)
        say("[synth] a note")
        stage_end("synth", "[mmflow] synth: committed in 1.0s: num_samples=4")
    assert progress.installed() is None
    lines = out.getvalue().splitlines()
    assert lines[0] == "[mmflow] synth: running"
    assert re.fullmatch(
        r"\[synth\] 4/4 samples \(100%\) [\d.]+ samples/s elapsed 0s ETA 0s", lines[1]
    )
    assert lines[2:] == ["[synth] a note", "[mmflow] synth: committed in 1.0s: num_samples=4"]
    assert "\x1b" not in out.getvalue()


def test_live_console_draws_a_bar_per_running_stage_and_keeps_the_summary():
    out = Terminal()
    with Console(stream=out) as console:
        assert console.live
        stage_begin("train", "[mmflow] train: running")
        bar = Progress(10, "train", unit="steps")
        bar.update(5, "loss 0.5")
        console._bars.refresh()
        drawn = ANSI.sub("", out.getvalue())
        assert "5/10 steps (50%)" in drawn and "steps/s" in drawn and "loss 0.5" in drawn
        stage_end("train", "[mmflow] train: committed in 2.0s")
    text = out.getvalue()
    assert "\x1b[" in text  # drawn, not printed line by line
    after = ANSI.sub("", text.split("committed in 2.0s")[-1])
    assert "━" not in after and "steps" not in after  # the finished stage's bar is gone


def test_worker_messages_are_shown_as_the_console_own():
    out = io.StringIO()
    with Console(stream=out) as console:
        bar = Progress(3, "filter", unit="shards")
        for line in (
            progress.MARK + '{"kind": "line", "text": "[train] resumed from step 10"}',
            progress.MARK + '{"kind": "tick", "desc": "filter", "n": 3, "counts": {"rows": 7}}',
        ):
            console.worker_message(progress.decode(line))
        state = {**bar.state(), "desc": "lm", "done": 2, "total": 2, "unit": "steps"}
        console.worker_message({"kind": "progress", "state": state})
    lines = out.getvalue().splitlines()
    assert lines[0] == "[train] resumed from step 10"
    assert lines[1].startswith("[filter] 3/3 shards (100%)") and lines[1].endswith("rows 7")
    assert lines[2].startswith("[lm] 2/2 steps (100%)")


# ---- mmflow run, end to end -------------------------------------------------------------------


def test_a_terminal_shows_progress_and_summaries_and_no_chatter(tmp_path):
    """The acceptance test of the console: a successful run of a DeepSpeed stage (one worker:
    one Ray task, Ray Train's local mode), in a terminal, shows its bar with rate, ETA and loss and its summary line, and no
    traceback, warning or other line of Ray's, Ray Train's, Ray Data's or DeepSpeed's."""
    path = pipeline_yaml(tmp_path, "train:\n  type: tests.test_console:TinyDeepSpeed\n", name="con")
    code, raw = run_in_terminal(["run", path], cwd=str(tmp_path))
    lines = screen_lines(raw)
    shown = "\n".join(lines)
    assert code == 0, shown[-4000:]
    assert "\x1b[" in raw  # a live display, not plain lines
    assert [line for line in lines if CHATTER.search(line)] == [], shown[-4000:]
    logs = next(line for line in lines if line.startswith("[mmflow] Ray: a local instance; "))
    log_file = re.search(r"this driver's: (\S+);", logs).group(1)
    assert os.path.exists(log_file)
    summary = [line for line in lines if re.match(r"\[mmflow\] \w+: committed in", line)]
    assert summary == [next(line for line in summary if line.startswith("[mmflow] train: "))]
    assert summary[0].endswith(": steps=24")
    drawn = ANSI.sub("", raw)  # every frame of the bars
    assert re.search(
        r"train .*\b([1-9]|1\d|2[0-3])/24 steps \(\d+%\) [\d.]+ steps/s ETA \S+", drawn
    )
    assert re.search(r"train .*\b24/24 steps \(100%\) [\d.]+ steps/s ETA 0s loss \S+", drawn)
    assert "[mmflow] con: 1 executed, 0 cached" in shown
    # what the console left out is in Ray's logs
    worker_logs = os.path.dirname(log_file)
    found = subprocess.run(
        ["grep", "-rl", "Reported metrics", worker_logs], capture_output=True, text=True
    )
    assert found.stdout.strip(), "Ray Train's lines should be in Ray's log files"


@pytest.fixture(scope="module")
def joined(ray_session):
    """The session's Ray, which the CLI runs below join (RAY_ADDRESS), as a Ray job does."""
    return ray_session


def test_a_log_gets_plain_lines_errors_in_brief_and_verbose_brings_ray_back(tmp_path, joined):
    """Piped, on a cluster (as in a Ray job's log): the same reports as plain lines; a failed
    stage's error in one line and the resume command, the traceback in the log file; and
    with --verbose, Ray's own lines as well."""
    path = pipeline_yaml(tmp_path, SYNTH + "bad:\n  type: tests.test_console:Broken\n", name="con")
    r = run_cli("run", path, cwd=str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "\x1b" not in out and "\r" not in out
    assert [line for line in out.splitlines() if CHATTER.search(line)] == [], out[-3000:]
    assert re.search(r"^\[mmflow\] Ray: joined the cluster at \S+; its logs: ", r.stdout, re.M)
    assert "Connecting to existing Ray cluster" not in out  # Ray's own note of it
    assert re.search(r"^\[synth\] 200/200 samples \(100%\) [\d.]+ samples/s", r.stdout, re.M)
    assert re.search(r"^\[mmflow\] synth: committed in [\d.]+s: num_samples=200,", r.stdout, re.M)
    error = "RuntimeError: shard 00000 failed: ValueError: no pictures in shard 0"
    assert re.search(rf"^\[mmflow\] bad: failed after [\d.]+s: {error}$", r.stdout, re.M)
    assert f"stage 'bad' failed: {error}\n" in r.stderr
    assert f"to resume run:\n  mmflow run {path}" in r.stderr
    log_file = re.search(r"the whole traceback is in (\S+)", r.stderr).group(1)
    with open(log_file) as f:
        assert "Traceback (most recent call last)" in f.read()

    loud = run_cli("run", path, "--verbose", cwd=str(tmp_path))
    assert loud.returncode == 1
    assert "Connecting to existing Ray cluster" in loud.stdout + loud.stderr
    assert "[mmflow] synth: cached" in loud.stdout and f"stage 'bad' failed: {error}" in loud.stderr


def test_what_a_worker_reports_is_one_marked_line_each(joined):
    """In a Ray worker, reports are marked lines on stdout, for the driver's console."""

    @joined.remote(num_cpus=0)
    def work() -> tuple[bool, str]:
        import contextlib

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            say("[w] hello")
            progress.tick("bar", 2, rows=5)
            Progress(3, "w", unit="steps").update(3)
        return progress.in_ray_worker(), out.getvalue()

    in_worker, written = joined.get(work.remote())
    assert in_worker and not progress.in_ray_worker()
    messages = [progress.decode(line) for line in written.splitlines()]
    assert [m["kind"] for m in messages] == ["line", "tick", "progress"], written
    assert messages[0]["text"] == "[w] hello"
    assert messages[1] == {"kind": "tick", "desc": "bar", "n": 2, "counts": {"rows": 5}}
    assert messages[2]["state"]["done"] == 3 and messages[2]["state"]["unit"] == "steps"


def test_native_writes_to_fd_2_go_to_a_file_and_python_stderr_stays(tmp_path):
    """What native code writes straight to file descriptor 2 (Ray's core worker in the driver
    does) goes to the console's ``native_log`` while it is entered; Python's ``sys.stderr``,
    where mmflow's errors go, stays on the terminal, and fd 2 comes back on exit. The file
    outlives the block only when the block failed (the CLI names it then), not after a stop."""
    script = textwrap.dedent(
        """
        import os, sys
        from mmflow.console import Console
        with Console(live=False) as c:
            os.write(2, b"native noise\\n")
            print("python error", file=sys.stderr)
            path = c.native_log
            with open(path) as f:
                print("inside:", f.read().strip())
        os.write(2, b"native after\\n")
        print(path, os.path.exists(path), c.native_log)
        try:
            with Console(live=False) as c:
                os.write(2, b"native before a failure\\n")
                raise RuntimeError("stage failed")
        except RuntimeError:
            pass
        print(c.native_log)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "inside: native noise" in lines
    assert "python error" in done.stderr and "native after" in done.stderr
    assert "native noise" not in done.stderr and "native before a failure" not in done.stderr
    assert lines[-2].endswith(" False None")  # a clean exit leaves no file behind
    with open(lines[-1]) as f:  # a failed one keeps what native code wrote
        assert f.read() == "native before a failure\n"
    os.remove(lines[-1])
    # a stop is no failure: Ctrl-C, or the SystemExit Ray's SIGTERM handler raises
    stops = textwrap.dedent(
        """
        import os
        from mmflow.console import Console
        for stop in (KeyboardInterrupt, SystemExit):
            try:
                with Console(live=False) as c:
                    os.write(2, b"native before a stop\\n")
                    path = c.native_log
                    raise stop()
            except stop:
                print(os.path.exists(path), c.native_log)
        """
    )
    done = subprocess.run([sys.executable, "-c", stops], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False None"] * 2, done.stdout
    # verbose leaves fd 2 alone
    verbose = textwrap.dedent(
        """
        import os
        from mmflow.console import Console
        with Console(live=False, verbose=True) as c:
            os.write(2, b"native noise\\n")
        print(c.native_log)
        """
    )
    done = subprocess.run([sys.executable, "-c", verbose], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=120)  # fmt: skip
    assert "native noise" in done.stderr and done.stdout.strip().splitlines()[-1] == "None"
