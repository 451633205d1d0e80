"""Runner: fingerprints, DAG slicing, cache hits, atomic commit, failure and resume, MLflow runs."""

from __future__ import annotations

import json
import os

import mlflow
import pytest

from mmflow.config import load_pipeline
from mmflow.runner import Runner, SelectionError, StageFailed

TOY = """
numbers:
  type: tests.toy_stages:ToyNumbers
  params: {n: 3}
total:
  type: tests.toy_stages:ToySum
  inputs: {numbers: numbers}
  params: {fail_once_marker: "%s"}
"""


@pytest.fixture
def toy(write_pipeline, tmp_path):
    return write_pipeline(TOY % "")


def runner(path, *sets):
    return Runner(load_pipeline(path, list(sets)))


def total(r: Runner) -> int:
    return json.loads(open(os.path.join(r.uri("total"), "total", "total.json")).read())["total"]


def files_with_mtimes(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[p] = os.stat(p).st_mtime_ns
    return out


def test_fingerprints_follow_params_upstream_and_version(toy, monkeypatch):
    a = runner(toy).fingerprints
    assert runner(toy).fingerprints == a  # stable
    b = runner(toy, "numbers.params.n=4").fingerprints
    assert b["numbers"] != a["numbers"] and b["total"] != a["total"]  # downstream follows upstream
    c = runner(toy, "total.params.scale=2").fingerprints
    assert c["numbers"] == a["numbers"] and c["total"] != a["total"]
    from tests.toy_stages import ToySum

    monkeypatch.setattr(ToySum, "version", "2")
    assert runner(toy).fingerprints["total"] != a["total"]


def test_run_commits_then_second_run_is_a_pure_cache_hit(toy, ray_session, tmp_path):
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    r = runner(toy)
    report = r.run()
    # a run must not leave its store in the environment, where it would override the next
    # pipeline's own tracking_uri in this process (mlflow.set_tracking_uri does that)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    assert report.executed == ["numbers", "total"] and total(r) == 0 + 1 + 2
    for name in ("numbers", "total"):
        man = json.load(open(os.path.join(r.uri(name), "_MANIFEST.json")))
        assert man["fingerprint"] == r.fingerprints[name] and man["mlflow_run_id"]
        assert not os.path.exists(os.path.join(r.uri(name), "_work"))
    assert [s.state for s in r.status()] == ["done", "done"]
    before = files_with_mtimes(tmp_path / "store")
    report2 = runner(toy).run()
    assert report2.executed == [] and report2.cached == ["numbers", "total"]
    assert files_with_mtimes(tmp_path / "store") == before  # nothing rewritten

    # MLflow: one parent per invocation, one child per executed stage, cache hits linked on the parent.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == report.parent_run_id]
    assert len(parents) == 2 and sorted(c.data.tags["mmflow.stage"] for c in children) == [
        "numbers",
        "total",
    ]
    child_total = next(c for c in children if c.data.tags["mmflow.stage"] == "total")
    assert (
        child_total.data.metrics["total"] == 3
        and child_total.data.params["fingerprint"] == r.fingerprints["total"]
    )
    second = client.get_run(report2.parent_run_id)
    assert second.data.tags["mmflow.cached.total"] == child_total.info.run_id


def test_changed_param_reruns_only_what_depends_on_it(toy, ray_session):
    runner(toy).run()
    r = runner(toy, "total.params.scale=10")
    assert [s.state for s in r.status()] == ["done", "stale"]
    report = r.run()
    assert report.executed == ["total"] and report.cached == ["numbers"] and total(r) == 30


def test_only_needs_committed_upstream(toy, ray_session):
    with pytest.raises(SelectionError, match="needs the output of 'numbers'"):
        runner(toy).run(only=["total"])
    assert runner(toy).run(only=["numbers"]).executed == ["numbers"]
    assert runner(toy).run(only=["total"]).executed == ["total"]


def test_from_and_force(toy, ray_session):
    runner(toy).run()
    assert runner(toy).select(from_stage="numbers") == ["numbers", "total"]
    assert runner(toy).run(from_stage="total", force=True).executed == ["total"]
    with pytest.raises(SelectionError, match="no stage 'nope'"):
        runner(toy).select(only=["nope"])


def test_failure_is_recorded_and_resume_finishes(write_pipeline, ray_session, tmp_path):
    marker = tmp_path / "failed-once"
    path = write_pipeline(TOY % marker)
    r = runner(path, "numbers.params.offset=1")
    with pytest.raises(StageFailed) as e:
        r.run()
    assert e.value.stage == "total" and "injected failure" in str(e.value.cause)
    assert "--set numbers.params.offset=1" in e.value.resume
    st = {s.name: s for s in r.status()}
    assert st["numbers"].state == "done" and st["total"].state == "failed"
    assert "injected failure" in st["total"].error
    assert not os.path.exists(os.path.join(r.uri("total"), "_MANIFEST.json"))
    report = runner(path, "numbers.params.offset=1").run()  # the printed resume: same command
    assert report.cached == ["numbers"] and report.executed == ["total"] and total(r) == 1 + 2 + 3
    assert not os.path.exists(os.path.join(r.uri("total"), "_FAILED.json"))


def test_placement_group_cleaner_asks_the_gcs_when_there_is_no_dashboard(ray_session):
    """The hook the local Ray runs in each worker: Ray Train's cleaner learns whether an actor
    lives from the GCS, where its own state-API query fails without a dashboard."""
    import time

    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from mmflow.runner import gcs_actor_liveness

    @ray_session.remote(num_cpus=0)
    class Probe:
        def actor_id(self) -> str:
            return ray_session.get_runtime_context().get_actor_id()

    probe = Probe.remote()
    actor_id = ray_session.get(probe.actor_id.remote())
    original = placement_group_cleaner.is_actor_alive
    try:
        gcs_actor_liveness()
        is_alive = placement_group_cleaner.is_actor_alive
        assert is_alive is not original and is_alive(actor_id, timeout=5)
        ray_session.kill(probe)
        deadline = time.time() + 30
        while is_alive(actor_id, timeout=5) and time.time() < deadline:
            time.sleep(0.2)
        assert not is_alive(actor_id, timeout=5)
        assert not is_alive("ff" * 16, timeout=5)  # an actor the GCS never saw
    finally:
        placement_group_cleaner.is_actor_alive = original
