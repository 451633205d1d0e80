"""Tracking against a real ``mlflow server`` process on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from mmflow.config import load_pipeline
from mmflow.runner import Runner


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{d}/server.db",
            "--artifacts-destination",
            str(d / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=open(d / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (d / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(30)


def test_runs_params_metrics_and_pictures_reach_the_server(
    mlflow_server, write_pipeline, ray_session
):
    path = write_pipeline(
        """
    synth:
      type: synth_shapes
      params: {num_samples: 40, samples_per_shard: 20, image_size: 16}
    """,
        name="served",
    )
    runner = Runner(load_pipeline(path, tracking_uri=mlflow_server))
    report = runner.run()
    runner2 = Runner(load_pipeline(path, tracking_uri=mlflow_server))
    report2 = runner2.run()
    assert report2.executed == [] and report2.cached == ["synth"]

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("served")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {report.parent_run_id, report2.parent_run_id}
    [child] = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == report.parent_run_id]
    assert child.info.status == "FINISHED" and child.data.tags["mmflow.stage"] == "synth"
    assert child.data.params["params.num_samples"] == "40"
    assert child.data.params["fingerprint"] == runner.fingerprints["synth"]
    assert child.data.metrics["num_samples"] == 40 and child.data.metrics["duration_s"] > 0
    assert "images/samples.png" in [
        a.path for a in client.list_artifacts(child.info.run_id, "images")
    ]
    assert (
        client.get_run(report2.parent_run_id).data.tags["mmflow.cached.synth"] == child.info.run_id
    )


def test_uris_with_credentials_are_redacted_in_tags_and_params(tmp_path):
    """A password or a signed query in a command, output or param never reaches MLflow."""
    from mmflow.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/m.db"
    tracker = Tracker(uri, "redact")
    parent = tracker.start_parent(
        "mmflow run p.yaml --tracking-uri postgresql://me:hunter2@db/mlflow",
        {"overrides": "a.params.url=https://h/list.txt?token=tok123"},
    )
    child = tracker.start_stage("s", "toy", "f" * 16, "http://me:hunter2@store/out")
    tracker.log_params(
        child,
        {"output_uri": "s3://b/k?X-Amz-Signature=sig456", "inputs.a": "http://me:hunter2@h/x"},
    )
    tracker.log_inputs(child, {"a": ("http://me:hunter2@h/x", "0" * 16)})
    client = mlflow.MlflowClient(tracking_uri=uri)
    stored = []
    for run_id in (parent, child):
        run = client.get_run(run_id)
        stored += [*run.data.tags.values(), *run.data.params.values()]
        stored += [d.dataset.source for d in run.inputs.dataset_inputs]
    text = "\n".join(stored)
    assert "hunter2" not in text and "tok123" not in text and "sig456" not in text, text
    assert "postgresql://me:***@db/mlflow" in text and "http://me:***@store/out" in text
