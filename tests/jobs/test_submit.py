"""Submitting a pipeline as a Ray job to a running cluster (a real head node on loopback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_cli


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head --block` in its own process group; stopped by killing that group."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    dash = _port()
    # Like a provisioned node: the locked environment is first on PATH, so jobs' `python` is it.
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--port",
        str(_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(_port()),
        "--dashboard-agent-listen-port",
        str(_port()),
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    import urllib.error
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 before a token is sent): the dashboard is up
        except OSError:
            assert proc.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray dashboard did not come up in 180 s"
            time.sleep(1)
    yield address
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        p.terminate()
    psutil.wait_procs(family, timeout=30)
    for p in family:
        if p.is_running():
            p.kill()


def test_submit_runs_the_pipeline_on_the_cluster(ray_cluster, tmp_path):
    store, db = tmp_path / "store", f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "pipelines/quickstart.yaml",
        "--storage",
        str(store),
        "--tracking-uri",
        db,
        "--set",
        "synth.params.num_samples=64",
        "--set",
        "synth.params.samples_per_shard=32",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [sys.executable, "jobs/submit.py", "--address", ray_cluster, *args, "--only", "synth"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout and "Connecting to existing Ray cluster" in r.stdout
    status = json.loads(run_cli("status", *args, "--json", cwd=ROOT).stdout)
    synth = next(s for s in status["stages"] if s["name"] == "synth")
    assert synth["state"] == "done" and synth["metrics"]["num_samples"] == 64
