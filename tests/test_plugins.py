"""Stage types found through entry points: lazily, by name, built-in and third-party alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmflow.plugins import StageTypeError, get_stage_type, stage_type_names, stage_types
from tests.conftest import ROOT, run_cli, run_pipeline

BUILT_IN = [
    "clip_filter", "clip_train", "import_shards", "ingest_urls", "pretokenize", "synth_shapes",
    "vqgan_train",
]  # fmt: skip


def test_every_built_in_and_the_installed_example_are_entry_points():
    names = stage_type_names()
    assert set(BUILT_IN) <= set(names) and "word_count" in names
    types = stage_types()
    assert all(types[n].type == n for n in names)
    assert types["word_count"].__module__ == "mmflow_example_plugin.stages"


def test_looking_up_one_type_imports_its_module_and_no_other():
    code = (
        "import sys, json; from mmflow.plugins import get_stage_type; import mmflow.config; "
        "get_stage_type('clip_filter'); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mmflow.stages'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "mmflow.stages",
        "mmflow.stages.clip_filter",
    ]


def test_module_class_names_still_work_and_bad_ones_are_clear():
    assert get_stage_type("tests.toy_stages:ToyNumbers").type == "toy_numbers"
    assert get_stage_type("no_such_type") is None
    assert get_stage_type("no_such_package.module:Stage") is None
    with pytest.raises(StageTypeError, match="not a mmflow Stage subclass"):
        get_stage_type("mmflow.storage:Storage")


def test_the_cli_lists_a_third_party_stage_type():
    out = run_cli("stages", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert listed["word_count"]["params"]["min_length"]["default"] == 1
    assert set(BUILT_IN) <= set(listed)


def test_a_third_party_stage_type_runs_in_a_pipeline(tmp_path, ray_session):
    runner, _ = run_pipeline(
        tmp_path,
        """
        synth:
          type: synth_shapes
          params: {num_samples: 40, samples_per_shard: 20, image_size: 16}
        words:
          type: word_count
          inputs: {shards: synth}
          params: {min_length: 3}
        """,
    )
    [row] = [r for r in runner.status() if r.name == "words"]
    assert row.state == "done" and row.metrics["num_distinct_words"] > 3
    counts = json.loads(open(os.path.join(row.outputs["counts"], "counts.json")).read())
    assert all(len(w) >= 3 for w in counts) and sum(counts.values()) > 40


def test_the_example_package_declares_its_stage_only_by_entry_point():
    """Nothing in mmflow names the example: the package is found because it is installed."""
    for folder, _, files in os.walk(os.path.join(ROOT, "mmflow")):
        for name in files:
            if name.endswith(".py"):
                assert "word_count" not in open(os.path.join(folder, name)).read(), name
