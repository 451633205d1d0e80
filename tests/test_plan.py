"""Planning without running: fingerprints, states from storage, selection. No Ray here."""

from __future__ import annotations

import json
import os

import pytest

from mmflow.config import load_pipeline
from mmflow.plan import Plan, SelectionError
from tests.test_runner import TOY


@pytest.fixture
def toy(write_pipeline):
    return write_pipeline(TOY % "")


def runner(path, *sets):
    return Plan(load_pipeline(path, list(sets)))


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


def _write(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_states_follow_what_storage_holds(toy):
    plan = runner(toy)
    assert [s.state for s in plan.status()] == ["missing", "missing"]
    out = os.path.join(plan.uri("numbers"), "numbers")
    _write(os.path.join(plan.uri("numbers"), "_MANIFEST.json"), {
        "outputs": {"numbers": {"kind": "table", "uri": out}}, "metrics": {"n": 3},
        "mlflow_run_id": "r1"})  # fmt: skip
    _write(
        os.path.join(plan.uri("total"), "_FAILED.json"), {"error": "boom", "mlflow_run_id": "r2"}
    )
    numbers, total = plan.status()
    assert (numbers.state, numbers.outputs, numbers.metrics) == ("done", {"numbers": out}, {"n": 3})
    assert (total.state, total.error, total.mlflow_run_id) == ("failed", "boom", "r2")
    latest = os.path.join(os.path.dirname(plan.uri("numbers")), "_LATEST.json")
    _write(latest, {"output": plan.uri("numbers")})
    changed = runner(toy, "numbers.params.n=5")
    assert changed.status()[0].state == "stale"
    assert changed.status()[0].output == plan.uri("numbers")  # the older commit it points to


def test_selection_needs_committed_inputs(toy):
    plan = runner(toy)
    assert plan.select() == ["numbers", "total"]
    assert plan.select(from_stage="numbers") == ["numbers", "total"]
    with pytest.raises(SelectionError, match="needs the output of 'numbers'"):
        plan.select(only=["total"])
    with pytest.raises(SelectionError, match="no stage 'nope'"):
        plan.select(only=["nope"])


def test_the_resume_command_never_shows_credentials(write_pipeline):
    path = write_pipeline(TOY % "")
    plan = Plan(load_pipeline(path, tracking_uri="postgresql://me:s3cret@db/mlflow"))
    cmd = plan.resume_command(["total"], None)
    assert "s3cret" not in cmd and "postgresql://me:***@db/mlflow" in cmd
