"""Runner: fingerprints, DAG slicing, cache hits, atomic commit, failure and resume, MLflow runs."""

from __future__ import annotations

import json
import os

import mlflow
import pytest

from mmflow.config import load_pipeline
from mmflow.runner import Runner, SelectionError, StageFailed
from tests.conftest import kill_tree

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


# --- leftovers, forced re-execution, commit order, one writer -----------------------------------


def test_the_runner_empties_a_non_resumable_stages_outputs_before_it_runs(toy, ray_session):
    r = runner(toy)
    r.run(only=["numbers"])
    stale = os.path.join(r.uri("total"), "total", "stale-part.json")
    os.makedirs(os.path.dirname(stale))
    open(stale, "w").write("{}")  # what an interrupted attempt left behind
    os.makedirs(os.path.join(r.uri("total"), "_work"))
    r.run()
    assert not os.path.exists(stale) and total(r) == 0 + 1 + 2
    assert not os.path.exists(os.path.join(r.uri("total"), "_work"))


def test_a_forced_rerun_builds_aside_and_replaces_the_output_only_at_its_commit(
    write_pipeline, ray_session, tmp_path
):
    marker = tmp_path / "fail-once"
    path = write_pipeline(TOY % marker)
    open(marker, "w").close()  # the first run does not fail
    r = runner(path)
    r.run()
    man = json.load(open(os.path.join(r.uri("total"), "_MANIFEST.json")))
    first = json.load(open(man["outputs"]["total"]["uri"] + "/total.json"))
    os.remove(marker)  # the forced run fails
    with pytest.raises(StageFailed):
        runner(path).run(only=["total"], force=True)
    assert json.load(open(os.path.join(r.uri("total"), "_MANIFEST.json"))) == man
    assert json.load(open(man["outputs"]["total"]["uri"] + "/total.json")) == first
    assert not os.path.exists(os.path.join(r.uri("total"), "_FAILED.json"))  # still done
    assert {s.name: s.state for s in runner(path).status()}["total"] == "done"

    assert runner(path).run(only=["total"], force=True).executed == ["total"]
    new = json.load(open(os.path.join(r.uri("total"), "_MANIFEST.json")))
    uri = new["outputs"]["total"]["uri"]
    assert "/_attempts/" in uri and new["mlflow_run_id"] != man["mlflow_run_id"]
    assert json.load(open(uri + "/total.json"))["written_at"] > first["written_at"]
    assert not os.path.exists(man["outputs"]["total"]["uri"])  # the replaced output is gone
    assert runner(path).run(only=["total"], force=True).executed == ["total"]
    attempts = os.listdir(os.path.join(r.uri("total"), "_attempts"))
    assert len(attempts) == 1  # each forced commit removes the attempt it replaced


def test_an_mlflow_failure_after_the_commit_loses_nothing(toy, ray_session, monkeypatch):
    from mmflow import tracking

    real = tracking.log_metrics

    def failing(uri, run_id, metrics, step=None):
        if "duration_s" in metrics:
            raise ConnectionError("tracking server went away")
        return real(uri, run_id, metrics, step)

    monkeypatch.setattr(tracking, "log_metrics", failing)
    r = runner(toy)
    r.run()
    assert {s.state for s in r.status()} == {"done"}
    for stage in ("numbers", "total"):
        assert not os.path.exists(os.path.join(r.uri(stage), "_FAILED.json"))
        man = json.load(open(os.path.join(r.uri(stage), "_MANIFEST.json")))
        assert man["metrics"]["duration_s"] > 0


def _toy_cli(path: str, *args: str, env: dict | None = None):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "mmflow.cli", "run", path, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_concurrent_runs_commit_each_output_once(toy, ray_session):
    env = {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "MMFLOW_TOY_SUM_SLEEP": "4",
        "MMFLOW_LEASE_TTL": "3",
    }
    # MLflow's sqlite schema migration itself races when two clients create one new database
    mlflow.MlflowClient(runner(toy).p.tracking_uri).search_experiments()
    a = _toy_cli(toy, env=env)
    b = _toy_cli(toy, env=env)
    out_a, out_b = a.communicate(timeout=300)[0], b.communicate(timeout=300)[0]
    assert a.returncode == 0 and b.returncode == 0, out_a + out_b
    assert "waiting for pid" in out_a + out_b  # one run waited on the other's lease
    r = runner(toy)
    assert total(r) == 0 + 1 + 2
    store = os.path.dirname(os.path.dirname(r.uri("total")))
    for stage in ("numbers", "total"):
        folders = [f for f in os.listdir(os.path.join(store, stage)) if not f.startswith("_")]
        assert folders == [r.fingerprints[stage]]
        found = os.listdir(os.path.join(store, stage, folders[0]))
        assert "_MANIFEST.json" in found and "_FAILED.json" not in found
        assert "_LEASE.json" not in found and "_attempts" not in found
    runs = mlflow.MlflowClient(r.p.tracking_uri).search_runs(
        [mlflow.MlflowClient(r.p.tracking_uri).get_experiment_by_name("t").experiment_id],
        "tags.`mmflow.stage` = 'total'",
    )
    assert len([x for x in runs if x.info.status == "FINISHED"]) == 1


def test_no_wait_refuses_while_another_run_writes(toy, ray_session):
    env = {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "MMFLOW_TOY_SUM_SLEEP": "8",
    }
    runner(toy).run(only=["numbers"])
    a = _toy_cli(toy, env=env)
    r = runner(toy)
    lease = os.path.join(r.uri("total"), "_LEASE.json")
    for _ in range(600):
        if os.path.exists(lease):
            break
        import time

        time.sleep(0.1)
    b = _toy_cli(toy, "--no-wait", env=env)
    out_b = b.communicate(timeout=120)[0]
    assert b.returncode == 2 and "is being written by pid" in out_b, out_b
    assert a.wait(timeout=300) == 0


def test_sigkill_during_a_forced_rerun_leaves_the_committed_output_intact(toy, ray_session):
    r = runner(toy)
    r.run()
    man_path = os.path.join(r.uri("total"), "_MANIFEST.json")
    man = open(man_path).read()
    out = json.loads(man)["outputs"]["total"]["uri"] + "/total.json"
    before = open(out).read()
    env = {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "MMFLOW_TOY_SUM_SLEEP": "60",
    }
    proc = _toy_cli(toy, "--only", "total", "--force", env=env)
    attempts = os.path.join(r.uri("total"), "_attempts")
    import glob
    import time

    deadline = time.time() + 120
    while not glob.glob(f"{attempts}/*/total/total.json") and time.time() < deadline:
        time.sleep(0.1)
    assert glob.glob(f"{attempts}/*/total/total.json"), "the forced attempt never wrote"
    kill_tree(proc)
    assert open(man_path).read() == man and open(out).read() == before
    assert {s.name: s.state for s in runner(toy).status()}["total"] == "done"
    assert runner(toy).run().cached == ["numbers", "total"]
