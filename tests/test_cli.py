"""The ``mmflow`` command end to end in subprocesses: kill -9 and resume, status, stages."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
import time

from tests.conftest import MMFLOW, ROOT, kill_tree, run_cli

QUICKSTART = os.path.join(ROOT, "pipelines", "quickstart.yaml")


def test_sigkill_during_synth_then_rerun_is_exact(tmp_path):
    n, per_shard = 3000, 100
    args = [
        "run",
        QUICKSTART,
        "--only",
        "synth",
        "--set",
        f"synth.params.num_samples={n}",
        "--set",
        f"synth.params.samples_per_shard={per_shard}",
        "--set",
        "synth.resources.workers=1",
        "--storage",
        str(tmp_path / "store"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    proc = subprocess.Popen(
        [*MMFLOW, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pattern = str(tmp_path / "store" / "quickstart" / "synth" / "*" / "shards" / "*_stats.json")
    deadline = time.time() + 240
    while len(glob.glob(pattern)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; make it bigger"
    kill_tree(proc)
    done_before = {p: os.stat(p).st_mtime_ns for p in glob.glob(pattern)}
    assert 3 <= len(done_before) < n // per_shard
    [out] = glob.glob(str(tmp_path / "store" / "quickstart" / "synth" / "*"))
    assert not os.path.exists(os.path.join(out, "_MANIFEST.json"))  # nothing committed

    status = json.loads(
        run_cli("status", QUICKSTART, *args[4:], "--json", cwd=str(tmp_path)).stdout
    )
    assert status["stages"][0]["state"] == "missing"

    r = run_cli(*args, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already done" in r.stdout
    for p, mtime in done_before.items():  # finished shards were not redone
        assert os.stat(p).st_mtime_ns == mtime
    keys = []
    for tar in sorted(glob.glob(os.path.join(out, "shards", "*.tar"))):
        with tarfile.open(tar) as tf:  # a truncated tar would raise here
            keys += [m.name[: -len(".jpg")] for m in tf.getmembers() if m.name.endswith(".jpg")]
    assert len(keys) == n and len(set(keys)) == n
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.startswith("._tmp")]
    assert leftovers == [] and not os.path.exists(os.path.join(out, "_work"))

    status = json.loads(
        run_cli("status", QUICKSTART, *args[4:], "--json", cwd=str(tmp_path)).stdout
    )
    [synth] = [s for s in status["stages"] if s["name"] == "synth"]
    assert status["pipeline"] == "quickstart"
    assert synth["state"] == "done" and synth["output"] == out and synth["mlflow_run_id"]
    assert synth["metrics"]["num_samples"] == n
    assert set(synth) >= {
        "name",
        "type",
        "state",
        "fingerprint",
        "output",
        "mlflow_run_id",
        "metrics",
    }


def test_stages_lists_params_with_defaults():
    r = subprocess.run([*MMFLOW, "stages", "--json"], capture_output=True, text=True, timeout=120)
    info = json.loads(r.stdout)["synth_shapes"]
    assert info["params"]["num_samples"]["default"] == 2048
    assert info["outputs"] == {"shards": "shards"}


def test_status_why_explains_a_stale_stage(write_pipeline, ray_session):
    from tests.test_runner import TOY

    path = write_pipeline(TOY % "")
    assert run_cli("run", path).returncode == 0
    r = run_cli("status", path, "--set", "numbers.params.n=5", "--why", "total")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = lines.index(next(x for x in lines if x.startswith("total is stale: fingerprint ")))
    assert lines[at + 1].startswith("  input numbers: numbers.numbers ")
    assert lines[at + 1].endswith(", because in numbers:")
    assert lines[at + 2] == "    param n: 3 -> 5"
    r = run_cli("status", path, "--set", "total.params.scale=2", "--why", "--json")
    rows = {s["name"]: s for s in json.loads(r.stdout)["stages"]}
    assert "why" not in rows["numbers"]  # done: only stages that are not done are explained
    assert rows["total"]["why"]["changes"] == [
        {"what": "param", "name": "scale", "old": 1, "new": 2}
    ]
    r = run_cli("status", path, "--why", "total")
    assert "total is done: its committed output has this fingerprint" in r.stdout
    r = run_cli("status", path, "--why", "totl")
    assert r.returncode == 2 and "no stage 'totl' (stages: numbers, total)" in r.stderr


HEAVY = ("torch", "ray", "transformers", "open_clip", "deepspeed")
PROBE = f"""
import json, sys
from mmflow.cli import main
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "imported": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_status_and_a_cached_run_import_no_torch_and_no_ray(tmp_path):
    """The control path of the quickstart: ``status`` and a run where every stage is a cache
    hit load every stage type but never import torch or Ray (so never start Ray). The store
    is every stage's manifest at its fingerprint, as a commit leaves it; nothing reads more."""
    from mlflow import MlflowClient

    from mmflow.config import load_pipeline
    from mmflow.plan import Plan

    store, turi = str(tmp_path / "store"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = Plan(load_pipeline(QUICKSTART, storage=store, tracking_uri=turi))
    for name, cfg in plan.p.stages.items():
        outputs = {o: {"kind": k, "uri": os.path.join(plan.uri(name), o)}
                   for o, k in cfg.stage_type.outputs.items()}  # fmt: skip
        plan.storage.write_json(os.path.join(plan.uri(name), "_MANIFEST.json"), {
            "fingerprint": plan.fingerprints[name], "outputs": outputs, "mlflow_run_id": "r0"})  # fmt: skip
    args = [QUICKSTART, "--storage", store, "--tracking-uri", turi]
    for command in ("status", "run"):
        r = subprocess.run([sys.executable, "-c", PROBE, command, *args],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout.splitlines()[-1]) == {"code": 0, "imported": []}
    assert "0 executed, 10 cached" in r.stdout
    client = MlflowClient(turi)
    [parent] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    cached = {k for k, v in parent.data.tags.items() if k.startswith("mmflow.cached.")}
    assert cached == {f"mmflow.cached.{n}" for n in plan.p.stages}
