"""Submitting a pipeline as a Ray job to a running cluster (a real head node on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli
from tests.jobs.cluster import LocalCluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node on loopback (tests/jobs/cluster.py), as a provisioned cluster would have;
    yields the dashboard address jobs are submitted to."""
    cluster = LocalCluster(str(tmp_path_factory.mktemp("cluster")), {}, fast_failure=False)
    try:
        cluster.start_head(cpus=2)
        yield cluster.dashboard
    finally:
        cluster.stop()


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
    assert "SUCCEEDED" in r.stdout and "[mmflow] Ray: joined the cluster at " in r.stdout
    status = json.loads(run_cli("status", *args, "--json", cwd=ROOT).stdout)
    synth = next(s for s in status["stages"] if s["name"] == "synth")
    assert synth["state"] == "done" and synth["metrics"]["num_samples"] == 64


def _load_submit():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mmflow_jobs_submit", f"{ROOT}/jobs/submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeJobs:
    """Stands in for JobSubmissionClient: records what would reach the cluster."""

    submitted: list = []

    def __init__(self, address):
        pass

    def submit_job(self, entrypoint, runtime_env):
        self.submitted.append((entrypoint, runtime_env))
        return "job-1"

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus.SUCCEEDED

    def get_job_logs(self, job_id):
        return "tracking at http://me:hunter2@mlflow:5000\n"


def test_submit_sends_no_credentials_to_the_job(monkeypatch, capsys):
    """AWS secrets stay out of the job's env vars (shown by the dashboard and job API);
    settings are forwarded, and the printed log is redacted."""
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeJobs)
    _FakeJobs.submitted = []
    for k, v in {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret-key-value",
        "AWS_SESSION_TOKEN": "session-token-value",
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    }.items():
        monkeypatch.setenv(k, v)
    submit = _load_submit()
    assert submit.main(["--address", "http://127.0.0.1:1", "p.yaml", "--only", "synth"]) == 0
    [(entrypoint, runtime_env)] = _FakeJobs.submitted
    env = runtime_env["env_vars"]
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_SESSION_TOKEN" not in env
    assert "AWS_ACCESS_KEY_ID" not in env
    assert env["AWS_REGION"] == "eu-west-1" and env["MLFLOW_TRACKING_URI"].endswith(":5000")
    out = capsys.readouterr().out
    assert "hunter2" not in out and "http://me:***@mlflow:5000" in out


def test_submit_refuses_credentials_in_the_job_spec(monkeypatch, capsys):
    """A tracking URI with a password would sit in the job's env or entrypoint: refused."""
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeJobs)
    _FakeJobs.submitted = []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://me:hunter2@db/mlflow")
    submit = _load_submit()
    assert submit.main(["--address", "http://127.0.0.1:1", "p.yaml"]) == 2
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    args = ["p.yaml", "--tracking-uri", "http://me:hunter2@mlflow:5000"]
    assert submit.main(["--address", "http://127.0.0.1:1", *args]) == 2
    err = capsys.readouterr().err
    assert _FakeJobs.submitted == [] and "hunter2" not in err and "me:***@" in err
    assert (
        submit.main(["--address", "http://127.0.0.1:1", "--allow-credentials-in-job", *args]) == 0
    )
    assert len(_FakeJobs.submitted) == 1
    assert "hunter2" not in capsys.readouterr().out
