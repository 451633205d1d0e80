"""Planning without running: fingerprints, states from storage, why a stage is not done,
selection. Ray only for the one real run whose manifests ``why`` is compared with."""

from __future__ import annotations

import json
import os

import pytest

from mmflow.config import load_pipeline
from mmflow.plan import ABSENT, Plan, SelectionError
from tests.conftest import pipeline_yaml
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


# ---- why a stage is not done: against the manifests of a real run ----------------------------


@pytest.fixture(scope="module")
def committed(tmp_path_factory, ray_session):
    """The toy pipeline, run for real once: its manifests are what ``why`` compares with."""
    from mmflow.runner import Runner

    path = pipeline_yaml(tmp_path_factory.mktemp("why"), TOY % "")
    assert Runner(load_pipeline(path)).run().executed == ["numbers", "total"]
    return path


def _changes(why) -> list[tuple]:
    return [(c.what, c.name, c.old, c.new) for c in why.changes]


def test_why_a_done_stage_and_a_never_run_one(committed, tmp_path):
    assert runner(committed).why("total").state == "done"
    assert runner(committed).why("total").changes == []
    fresh = Plan(load_pipeline(committed, storage=str(tmp_path / "empty")))
    why = fresh.why("numbers")
    assert (why.state, why.committed, why.changes) == ("missing", None, [])
    assert why.note == "no output was ever committed"


def test_why_a_failed_stage_gives_its_error(write_pipeline, tmp_path, ray_session):
    from mmflow.runner import Runner, StageFailed

    path = write_pipeline(TOY % (tmp_path / "fail-once"))
    with pytest.raises(StageFailed):
        Runner(load_pipeline(path)).run()
    why = runner(path).why("total")
    assert (why.state, why.committed, why.changes) == ("failed", None, [])
    assert why.note == (
        "the last attempt failed: RuntimeError: injected failure; no output was ever committed"
    )


def test_why_names_the_changed_param_with_old_and_new_value(committed):
    plan = runner(committed, "total.params.scale=3")
    why = plan.why("total")
    assert (why.state, why.fingerprint) == ("stale", plan.fingerprints["total"])
    assert why.committed == runner(committed).fingerprints["total"]
    assert _changes(why) == [("param", "scale", 1, 3)]
    assert why.changes[0].describe() == "param scale: 1 -> 3"
    assert plan.why("numbers").state == "done"


def test_why_follows_a_changed_input_to_the_upstream_param(committed):
    before, plan = runner(committed), runner(committed, "numbers.params.offset=5")
    why = plan.why("total")
    old, new = before.fingerprints["numbers"], plan.fingerprints["numbers"]
    assert _changes(why) == [
        ("input", "numbers", f"numbers.numbers@{old}", f"numbers.numbers@{new}")
    ]
    assert why.changes[0].describe() == f"input numbers: numbers.numbers {old} -> {new}"
    because = why.changes[0].because
    assert (because.stage, because.committed) == ("numbers", old)
    assert _changes(because) == [("param", "offset", 0, 5)]


def test_why_compares_params_as_trees():
    from mmflow.plan import _diff

    old = {"arch": "a", "model_cfg": None, "train": {"max_steps": 150, "lr": 0.1}}
    new = {"arch": "a", "model_cfg": {"dim": 64}, "train": {"max_steps": 10, "lr": 0.1, "new": 1}}
    assert _diff(old, new) == [
        ("model_cfg", None, {"dim": 64}),
        ("train.max_steps", 150, 10),
        ("train.new", ABSENT, 1),
    ]


def test_why_names_a_bumped_code_version(committed, monkeypatch):
    from tests.toy_stages import ToySum

    monkeypatch.setattr(ToySum, "version", "2")
    why = runner(committed).why("total")
    assert _changes(why) == [("code_version", "", "1", "2")]
    assert why.changes[0].describe() == 'code version: "1" -> "2"'


def test_why_says_what_an_older_manifest_does_not_record(committed):
    plan = runner(committed, "total.params.scale=3")
    latest = os.path.join(plan.root, "t", "total", "_LATEST.json")
    man_path = os.path.join(json.load(open(latest))["output"], "_MANIFEST.json")
    man = json.load(open(man_path))
    try:
        _write(man_path, {k: v for k, v in man.items() if k != "params"})
        why = plan.why("total")
        assert "does not record params" in why.note
        assert ("param", "scale", ABSENT, 3) in _changes(why)
        assert "param scale: 3 (not recorded in the committed output)" in [
            c.describe() for c in why.changes
        ]
    finally:
        _write(man_path, man)
