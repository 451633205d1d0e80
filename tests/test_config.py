"""Pipeline validation: every problem is caught at load, named by file, stage and field."""

from __future__ import annotations

import os

import pytest

from mmflow.config import ConfigError, load_pipeline
from tests.conftest import ROOT, run_cli

TOY = """
numbers:
  type: tests.toy_stages:ToyNumbers
  params: {n: 3}
total:
  type: tests.toy_stages:ToySum
  inputs: {numbers: numbers}
"""


def problems(path, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_pipeline(path, **kw)
    return e.value.problems


def test_valid_pipeline_is_typed_and_ordered(write_pipeline):
    p = load_pipeline(write_pipeline(TOY))
    assert list(p.stages) == ["numbers", "total"]
    assert p.stages["numbers"].params.n == 3
    assert p.stages["total"].inputs["numbers"].stage == "numbers"
    assert p.stages["total"].inputs["numbers"].output == "numbers"


def test_quickstart_is_valid():
    p = load_pipeline(os.path.join(ROOT, "pipelines", "quickstart.yaml"))
    assert "synth" in p.stages


def test_misspelt_param_is_named_with_a_suggestion(write_pipeline):
    path = write_pipeline(TOY.replace("{n: 3}", "{n: 3, offest: 1}"))
    [msg] = problems(path)
    assert (
        path in msg
        and "'numbers'" in msg
        and "params.offest" in msg
        and "did you mean 'offset'" in msg
    )


def test_wrong_type(write_pipeline):
    [msg] = problems(write_pipeline(TOY.replace("{n: 3}", "{n: three}")))
    assert "params.n" in msg and "three" in msg


def test_unknown_stage_type(write_pipeline):
    [msg] = problems(write_pipeline("a:\n  type: synth_shape\n"))
    assert "unknown stage type 'synth_shape'" in msg and "synth_shapes" in msg


def test_missing_and_unknown_inputs(write_pipeline):
    path = write_pipeline(TOY.replace("inputs: {numbers: numbers}", "inputs: {numbrs: numbers}"))
    msgs = problems(path)
    assert any("inputs.numbrs" in m and "no input" in m for m in msgs)
    assert any("inputs.numbers" in m and "missing input" in m for m in msgs)


def test_input_from_unknown_stage_or_output(write_pipeline):
    assert (
        "no stage 'nums'"
        in problems(write_pipeline(TOY.replace("{numbers: numbers}", "{numbers: nums}")))[0]
    )
    msg = problems(write_pipeline(TOY.replace("{numbers: numbers}", "{numbers: numbers.rows}")))[0]
    assert "has no output 'rows'" in msg


def test_input_kind_must_match(write_pipeline):
    path = write_pipeline("""
    synth:
      type: synth_shapes
    total:
      type: tests.toy_stages:ToySum
      inputs: {numbers: synth}
    """)
    assert "needs table, but synth.shards is shards" in problems(path)[0]


def test_cycle_is_reported(write_pipeline):
    path = write_pipeline("""
    a:
      type: tests.toy_stages:ToySum
      inputs: {numbers: b}
    b:
      type: tests.toy_stages:ToySum
      inputs: {numbers: a}
    """)
    msgs = problems(path)
    assert any("cycle" in m and "a" in m and "b" in m for m in msgs)


def test_unknown_fields_and_resources(write_pipeline):
    msgs = problems(
        write_pipeline(
            TOY.replace("params: {n: 3}", "params: {n: 3}\n  resources: {cpu: 2}\n  prams: {}")
        )
    )
    assert any("resources.cpu" in m and "cpus" in m for m in msgs)
    assert any("'prams'" in m and "params" in m for m in msgs)


def test_set_overrides_are_validated(write_pipeline):
    path = write_pipeline(TOY)
    assert load_pipeline(path, ["numbers.params.n=7"]).stages["numbers"].params.n == 7
    assert "no stage 'numbrs'" in problems(path, overrides=["numbrs.params.n=7"])[0]
    assert "params.nn" in problems(path, overrides=["numbers.params.nn=7"])[0]
    with pytest.raises(ConfigError):
        load_pipeline(path, ["numbers.n=7"])


def test_tracking_uri_precedence(write_pipeline, monkeypatch):
    path = write_pipeline(TOY)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_pipeline(path).tracking_uri.endswith("mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert load_pipeline(path).tracking_uri == "http://127.0.0.1:1"
    assert load_pipeline(path, tracking_uri="sqlite:///x.db").tracking_uri == "sqlite:///x.db"


def test_cli_misspelt_param_exits_2_and_starts_nothing(tmp_path):
    r = run_cli(
        "run",
        os.path.join(ROOT, "pipelines", "quickstart.yaml"),
        "--set",
        "synth.params.num_sampels=5",
        "--storage",
        str(tmp_path / "store"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        cwd=str(tmp_path),
    )
    assert r.returncode == 2, r.stderr
    assert "num_sampels" in r.stderr and "num_samples" in r.stderr and "quickstart.yaml" in r.stderr
    assert os.listdir(tmp_path) == []  # no storage, no MLflow store, no Ray session


def test_optional_input_and_wiring_checks(write_pipeline):
    def pipeline(model_input: str, params: str) -> str:
        return write_pipeline(f"""
        synth:
          type: synth_shapes
        clip:
          type: clip_train
          inputs: {{shards: synth}}
        filter:
          type: clip_filter
          inputs: {{shards: synth{model_input}}}
          params: {{{params}}}
        """)

    # the CLIP named in params instead of wired: the optional `model` input may stay unwired
    ok = load_pipeline(pipeline("", "model: {arch: mmflow-clip-tiny}"))
    assert set(ok.stages["filter"].inputs) == {"shards"}
    wired = load_pipeline(pipeline(", model: clip", ""))
    assert wired.stages["filter"].inputs["model"].stage == "clip"
    neither = problems(pipeline("", ""))
    assert any("stage 'filter', field 'inputs.model'" in m and "no CLIP" in m for m in neither)
    both = problems(pipeline(", model: clip", "model: {arch: mmflow-clip-tiny}"))
    assert any("stage 'filter', field 'params.model'" in m and "keep one" in m for m in both)
