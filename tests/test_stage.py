"""The stage contract: declarations checked, what a stage may record and log."""

from __future__ import annotations

import pytest

from mmflow.stage import Resources, Stage, StageContext, check_stage_type, register
from mmflow.storage import Storage


def test_declarations_are_checked():
    class Good(Stage):
        type = "good"
        inputs = {"shards": "shards", "clip": "model"}
        optional_inputs = frozenset({"clip"})
        outputs = {"model": "model"}

    class BadKind(Stage):
        type = "bad_kind"
        outputs = {"x": "spreadsheet"}

    class BadOptional(Stage):
        type = "bad_optional"
        optional_inputs = frozenset({"missing"})

    assert check_stage_type(Good) == [] and register(Good) is Good
    assert "unknown kind 'spreadsheet'" in check_stage_type(BadKind)[0]
    with pytest.raises(ValueError, match="optional inputs must be among its inputs"):
        register(BadOptional)


def _ctx(tmp_path, logged: list) -> StageContext:
    return StageContext(
        pipeline="p",
        stage="s",
        params=None,
        resources=Resources(),
        inputs={},
        outputs={"model": str(tmp_path / "model")},
        work_uri=str(tmp_path / "_work"),
        storage=Storage(),
        tracking_uri="sqlite:///x.db",
        run_id=None,
        _log_metrics=lambda m, step: logged.append((m, step)),
    )


def test_context_keeps_final_metrics_and_output_facts(tmp_path):
    logged: list = []
    ctx = _ctx(tmp_path, logged)
    ctx.log_metrics({"loss": 2}, step=10)  # a history point: MLflow only
    ctx.log_metrics({"val_psnr": 31.5, "n": 3})
    assert ctx.metrics == {"val_psnr": 31.5, "n": 3.0}
    assert logged == [({"loss": 2.0}, 10), ({"val_psnr": 31.5, "n": 3.0}, None)]
    ctx.record_output("model", steps=5)
    ctx.record_output("model", arch="tiny")
    assert ctx.output_info == {"model": {"steps": 5, "arch": "tiny"}}
    with pytest.raises(KeyError, match="no output 'nope'"):
        ctx.record_output("nope", x=1)
    assert ctx.work("a", "b") == str(tmp_path / "_work" / "a" / "b")
