"""Benchmark: the control path, a fully cached rerun of the quickstart and ``mmflow status``.

Both are timed as the whole command a user types, in a fresh process each (interpreter start-up,
imports, loading and checking the pipeline, reading every stage's manifest):

- cached rerun: ``mmflow run pipelines/quickstart.yaml`` where every stage is a cache hit; it
  still records its MLflow parent run with a ``mmflow.cached.<stage>`` tag per stage;
- status: ``mmflow status pipelines/quickstart.yaml``.

Each runs ``--repeats`` times (3), alternately, and the medians are reported. Targets (issue 14):
cached rerun <= 10 s, status <= 3 s on the 2-core machine.

The fully cached store is built once in ``--workdir``, by the quickstart itself at tiny sizes
(``--set`` overrides: 256 samples, 4 steps per training stage; 19 minutes on a busy 2-core
machine, mostly Ray Train starting six times), unless it is already complete there. ``--store DIR`` uses an existing
quickstart store instead, at the YAML's sizes: ``DIR/mmflow-data`` and ``DIR/mlflow.db`` as a
fresh clone's ``mmflow run pipelines/quickstart.yaml`` leaves them (the database is copied into
the work folder, so DIR is only read).

    python tests/benchmarks/bench_control.py [--workdir DIR] [--store DIR] [--repeats 3]

Python compiles every module it imports from source when no ``.pyc`` can be read or written
(``PYTHONDONTWRITEBYTECODE=1`` with a virtual environment installed without compiled bytecode,
``uv sync`` without ``--compile-bytecode``): then MLflow's own import is most of a cached rerun.
``bytecode`` in the result says which case was measured.

The last line printed is one JSON object: cached_rerun_s, status_s (medians of wall-clock
seconds), cached_rerun_ok, status_ok (the target met and every run did what it should: all
stages cached, all done), the single runs (``*_runs_s``), the median CPU seconds of each command
(``*_cpu_s``: user + system, which a busy machine inflates less than wall time), tiny (whether
the store is the tiny one), bytecode, and the machine's 1-minute load average at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "pipelines", "quickstart.yaml")
TARGETS = {"cached_rerun_s": 10.0, "status_s": 3.0}
STEPS = "max_steps=4", "warmup_steps=1", "checkpoint_every=4", "log_every=2", "batch_size=16"
TINY = [
    "synth.params.num_samples=256",
    "synth.params.samples_per_shard=128",
    "clip_train.params.eval_samples=32",
    *(f"clip_train.params.train.{s}" for s in STEPS),
    "clip_filter.params.samples_per_shard=128",
    "clip_filter.params.preview=4",
    "vqgan_train.params.eval_samples=16",
    "vqgan_train.params.preview=4",
    "vqgan_train.params.loss.disc_start=2",
    "vqgan_train.params.train.eval_every=4",
    *(f"vqgan_train.params.train.{s}" for s in STEPS),
    "pretokenize.params.preview=4",
    "lm_train.params.val_rows=16",
    *(f"lm_train.params.train.{s}" for s in STEPS),
    "joint_train.params.val_rows=16",
    "joint_train.params.eval_prompts=4",
    "joint_train.params.eval_captions=4",
    "joint_train.params.judge_steps=10",
    "joint_train.params.judge_images=64",
    "joint_train.params.preview=4",
    *(f"joint_train.params.train.{s}" for s in STEPS),
    "llava_align.params.val_rows=16",
    *(f"llava_align.params.train.{s}" for s in STEPS),
    "llava_instruct.params.val_rows=16",
    "llava_instruct.params.vqa_images=8",
    *(f"llava_instruct.params.train.{s}" for s in STEPS),
]


def mmflow() -> list[str]:
    """The ``mmflow`` console script beside this Python (what a user runs), else ``-m``."""
    script = os.path.join(os.path.dirname(sys.executable), "mmflow")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "mmflow.cli"]


def timed(args: list[str], cwd: str) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds, the finished process) of one ``mmflow`` command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run([*mmflow(), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, r


def states(pipeline_args: list[str], cwd: str) -> dict[str, str]:
    r = subprocess.run([*mmflow(), "status", *pipeline_args, "--json"], cwd=cwd,
                       capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return {s["name"]: s["state"] for s in json.loads(r.stdout)["stages"]}


def bytecode() -> dict[str, bool]:
    import importlib.util

    spec = importlib.util.find_spec("mlflow")
    cached = importlib.util.cache_from_source(spec.origin) if spec and spec.origin else ""
    return {
        "dont_write_bytecode": bool(sys.flags.dont_write_bytecode),
        "mlflow_pyc_present": bool(cached) and os.path.exists(cached),
    }


def prepare(args) -> tuple[list[str], bool]:
    """The pipeline arguments of a fully cached quickstart store in ``args.workdir``."""
    os.makedirs(args.workdir, exist_ok=True)
    db = os.path.join(args.workdir, "mlflow.db")
    if args.store:
        if not os.path.exists(db):
            shutil.copy(os.path.join(args.store, "mlflow.db"), db)
        storage, overrides = os.path.join(args.store, "mmflow-data"), []
    else:
        storage, overrides = os.path.join(args.workdir, "mmflow-data"), TINY
    pipeline_args = [QUICKSTART, *(a for s in overrides for a in ("--set", s))]
    pipeline_args += ["--storage", storage, "--tracking-uri", f"sqlite:///{db}"]
    if set(states(pipeline_args, args.workdir).values()) != {"done"}:
        if args.store:
            raise SystemExit(f"{args.store}: not a complete quickstart store for this code")
        print(f"[bench] building the tiny quickstart store in {args.workdir} ...", flush=True)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run([*mmflow(), "run", *pipeline_args], cwd=args.workdir, env=env, check=True)
        left = {n: s for n, s in states(pipeline_args, args.workdir).items() if s != "done"}
        assert not left, f"stages not done after the build: {left}"
    return pipeline_args, not args.store


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mmflow-bench-control"),
                    help="where the tiny store is built (kept for the next time) and runs happen")  # fmt: skip
    ap.add_argument("--store", help="an existing quickstart store (DIR/mmflow-data, DIR/mlflow.db)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    pipeline_args, tiny = prepare(args)
    n = len(states(pipeline_args, args.workdir))
    commands = {
        "cached_rerun": (["run", *pipeline_args], lambda out: f"0 executed, {n} cached" in out),
        "status": (["status", *pipeline_args], lambda out: out.count(" done ") == n),
    }
    wall: dict[str, list[float]] = {k: [] for k in commands}
    cpu: dict[str, list[float]] = {k: [] for k in commands}
    ok = dict.fromkeys(commands, True)
    for _ in range(args.repeats):
        for key, (command, did_it) in commands.items():
            seconds, cpu_s, r = timed(command, args.workdir)
            wall[key].append(round(seconds, 2))
            cpu[key].append(round(cpu_s, 2))
            if r.returncode != 0 or not did_it(r.stdout):
                print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
                ok[key] = False
        print(f"[bench] cached rerun {wall['cached_rerun'][-1]} s, "
              f"status {wall['status'][-1]} s", flush=True)  # fmt: skip
    result: dict = {}
    for key in commands:
        result[f"{key}_s"] = round(statistics.median(wall[key]), 2)
        result[f"{key}_ok"] = ok[key] and result[f"{key}_s"] <= TARGETS[f"{key}_s"]
    for key in commands:
        result[f"{key}_runs_s"] = wall[key]
        result[f"{key}_cpu_s"] = round(statistics.median(cpu[key]), 2)
    result.update(tiny=tiny, bytecode=bytecode(), load_1min=round(os.getloadavg()[0], 2))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
