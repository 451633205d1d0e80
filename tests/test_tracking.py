"""Tracking against a real ``mlflow server`` process on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.parse
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


TOY = """
numbers:
  type: tests.toy_stages:ToyNumbers
  params: {n: 2}
total:
  type: tests.toy_stages:ToySum
  inputs: {numbers: numbers}
  params: {fail_once_marker: "%s"}
"""


def test_runs_are_named_after_what_ran_and_name_their_source(write_pipeline, tmp_path, ray_session):
    """The parent's name says which stages ran and how many were cached (or where it failed);
    every run names the pipeline file and its code version where MLflow's table shows them."""
    from mmflow import __version__
    from mmflow.runner import StageFailed

    path = write_pipeline(TOY % (tmp_path / "fail-once"))
    with pytest.raises(StageFailed):
        Runner(load_pipeline(path)).run()
    first = Runner(load_pipeline(path)).run()  # numbers is cached now, total runs
    again = Runner(load_pipeline(path)).run()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("t")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in parents] == [
        "t: numbers, total, failed at total",
        "t: total (+1 cached)",
        "t: all 2 cached",
    ]
    assert [r.info.run_id for r in parents[1:]] == [first.parent_run_id, again.parent_run_id]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.run_name for r in children] == ["numbers", "total", "total"]
    for run in runs:  # tmp_path is no git checkout: the version is mmflow's
        assert run.data.tags["mlflow.source.name"] == os.path.abspath(path)
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.git.commit"] == __version__


def test_an_existing_experiment_is_tagged_as_model_training_unless_it_says_otherwise(tmp_path):
    from mmflow.tracking import Tracker, ui_url

    uri = f"sqlite:///{tmp_path}/m.db"
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("old")
    mine = client.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    Tracker(uri, "old"), Tracker(uri, "mine")
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"
    url = ui_url(uri, "http://h:1", "new")
    new = client.get_experiment_by_name("new")
    route = f"/experiments/{new.experiment_id}/runs?workflowType=machine_learning"
    assert url == f"http://h:1/mmflow/open?to={urllib.parse.quote(route, safe='')}"


def test_a_run_that_loses_the_race_to_create_the_experiment_uses_the_winners(tmp_path):
    """Two runs of a new pipeline: both look the experiment up before either creates it; the
    second create fails in MLflow's store (a unique name) and must fall back to the first's."""
    from mmflow.tracking import experiment_id

    uri = f"sqlite:///{tmp_path}/m.db"
    client = mlflow.MlflowClient(uri)
    winner = experiment_id(client, "p")

    class Late(mlflow.MlflowClient):  # its lookup ran before the winner's create
        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return super().get_experiment_by_name(name)

    assert experiment_id(Late(uri), "p") == winner
    assert [e.name for e in client.search_experiments()].count("p") == 1


def test_the_ui_apps_page_opens_only_experiment_routes():
    from mmflow.ui_app import STORAGE_KEY, open_page

    body, status = open_page("/experiments/3/runs?workflowType=machine_learning")
    assert status == 200 and STORAGE_KEY in body and '"../#" + "/experiments/3/runs?' in body
    for bad in ("//evil.example/x", '/experiments/1"</script>', "javascript:alert(1)", ""):
        assert open_page(bad)[1] == 400, bad


def test_a_training_run_logs_system_metrics_until_it_ends(tmp_path, monkeypatch):
    """MLflow's own monitor samples CPU and memory into a training stage's run and stops with
    it; other stages' runs get none."""
    import threading

    from mmflow.tracking import Tracker

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    uri = f"sqlite:///{tmp_path}/m.db"
    tracker = Tracker(uri, "sys")
    tracker.start_parent("mmflow run sys.yaml", {})
    train = tracker.start_stage("train", "toy", "f" * 16, "/out/train", system_metrics=True)
    data = tracker.start_stage("data", "toy", "e" * 16, "/out/data")
    deadline = time.time() + 60
    client = mlflow.MlflowClient(uri)
    while time.time() < deadline and len(client.get_run(train).data.metrics) < 2:
        time.sleep(0.5)
    tracker.end(data)
    tracker.end(train)
    logged = client.get_run(train).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        logged
    ), logged
    assert client.get_run(data).data.metrics == {}
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    steps = len(client.get_metric_history(train, "system/cpu_utilization_percentage"))
    time.sleep(1.5)
    assert len(client.get_metric_history(train, "system/cpu_utilization_percentage")) == steps


def test_a_long_run_names_its_first_stages_and_counts_the_rest():
    from mmflow.tracking import parent_run_name

    ran = ["synth", "clip_train", "clip_filter", "vqgan_train", "pretokenize"]
    assert parent_run_name("q", ran, []) == "q: synth, clip_train, clip_filter and 2 more"
    assert parent_run_name("q", ran[:1], ran[1:]) == "q: synth (+4 cached)"
    assert parent_run_name("q", [], [], "KILLED") == "q: nothing run, killed"
