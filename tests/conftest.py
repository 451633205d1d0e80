"""Shared fixtures: one real local Ray for the session, pipelines written to tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray workers import test-only stages (tests.toy_stages) by module path.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# As mmflow/__init__.py does, before any test module imports ray: under `uv run`, Ray would
# start every worker through `uv run` again, from a copy of the working directory without .uv/.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
MMFLOW = [sys.executable, "-m", "mmflow.cli"]
# The suite runs in two processes (pytest-xdist, `-n 2` in pyproject.toml: part of its time is
# spent waiting on processes starting, which the other process fills; 28m27s against 32m51s in
# one on a 2-core host). Each gets a temp
# folder of its own, inherited by everything it starts (Ray's session folder included), so what a
# test looks for there (Ray's logs, the console's native-output files) is its own.
if WORKER := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["TMPDIR"] = os.path.join(tempfile.gettempdir(), f"mmflow-tests-{WORKER}")
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models run many times faster on one intra-op thread than contending for the shared
    machine's cores; for a test module (``pytestmark = pytest.mark.usefixtures(...)``), restored
    after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_stack():
    """MLflow as teams run it, for the session: PostgreSQL, moto S3 and infra/mlflow-server.sh
    with basic auth and artifacts proxied to S3 (tests/servers.py:tracking_stack)."""
    from tests.servers import tracking_stack

    with tracking_stack() as stack:
        yield stack


def pipeline_yaml(
    folder, stages_yaml: str, name: str = "t", filename: str = "pipeline.yaml"
) -> str:
    """Write a pipeline YAML into ``folder`` with storage and tracking inside ``folder``."""
    path = folder / filename
    path.write_text(
        f"name: {name}\nstorage: {folder / 'store'}\ntracking_uri: sqlite:///{folder / 'mlflow.db'}\n"
        "stages:\n" + textwrap.indent(textwrap.dedent(stages_yaml).strip("\n"), "  ") + "\n"
    )
    return str(path)


def run_pipeline(folder, stages_yaml: str, name: str = "t"):
    """Write the pipeline into ``folder`` and run it whole: (its Runner, the YAML's path)."""
    from mmflow.config import load_pipeline
    from mmflow.runner import Runner

    path = pipeline_yaml(folder, stages_yaml, name)
    runner = Runner(load_pipeline(path))
    runner.run()
    return runner, path


@pytest.fixture
def write_pipeline(tmp_path):
    """Write a pipeline YAML into tmp_path with storage and tracking inside tmp_path."""

    def write(stages_yaml: str, name: str = "t", filename: str = "pipeline.yaml") -> str:
        return pipeline_yaml(tmp_path, stages_yaml, name, filename)

    return write


def run_cli(*args: str, cwd: str | None = None, env: dict | None = None, timeout: int = 600):
    """``mmflow ARGS`` in a subprocess. When this process holds the session's Ray, the command
    joins it through RAY_ADDRESS, as a job on a cluster does, instead of starting its own (about
    15 s saved per run). Not with ``env``: the session's workers would not see those variables.
    Tests that kill the driver start it with Popen and their own Ray."""
    joined = {}
    if env is None and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        joined["RAY_ADDRESS"] = sys.modules["ray"].get_runtime_context().gcs_address
    return subprocess.run(
        [*MMFLOW, *args],
        cwd=cwd,
        env={**os.environ, **joined, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a ``mmflow`` driver and everything it started (its local Ray included), and
    remove the file a killed driver's console leaves behind (:func:`forget_native_log`)."""
    import contextlib
    import signal

    import psutil

    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)
    forget_native_log(proc.pid)


def forget_native_log(pid: int) -> None:
    """Remove the native-stderr file of a ``mmflow`` driver a test killed: the console keeps
    it, as after any failed run, and killed runs would pile them up in the temp folder."""
    import contextlib
    import tempfile

    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tempfile.gettempdir(), f"mmflow-native-{pid}.log"))
