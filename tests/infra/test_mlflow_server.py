"""infra/mlflow-server.sh as teams run it (tests/servers.py:tracking_stack): runs and the
registry in a real PostgreSQL, artifacts proxied to a real S3-compatible server (moto) whose
keys only the server holds, MLflow's basic-auth app on. A client without credentials, or with
wrong ones, is refused; with them, a real mmflow pipeline run by a process holding no S3 keys is
tracked there whole: parent and child runs, metrics, pictures (in the bucket, downloadable
through the server), the registered model."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import requests

from mmflow.export.mlflow import download_registered
from mmflow.models.vqgan import load_vqgan
from tests.conftest import MMFLOW
from tests.stages.test_vqgan_train import TINY_CFG

SEARCH = "/api/2.0/mlflow/experiments/search"


@pytest.fixture
def as_user(tracking_stack, monkeypatch):
    """This process as the stack's ordinary user, credentials from the environment only."""
    for k, v in tracking_stack.server.client_env().items():
        monkeypatch.setenv(k, v)
    return tracking_stack.server


def test_without_credentials_the_server_refuses(tracking_stack, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    server = tracking_stack.server
    url = server.url + SEARCH
    assert requests.get(url, params={"max_results": 1}, timeout=60).status_code == 401
    wrong = ("mmflow", "not-the-password")
    assert requests.get(url, params={"max_results": 1}, auth=wrong, timeout=60).status_code == 401
    user = (server.user, server.users[server.user])
    assert requests.get(url, params={"max_results": 1}, auth=user, timeout=60).status_code == 200
    # an ordinary user is not an admin: it cannot create users
    made = requests.post(
        server.url + "/api/2.0/mlflow/users/create",
        json={"username": "intruder", "password": "long-enough-password"},
        auth=user,
        timeout=60,
    )
    assert made.status_code == 403, made.text

    # MLflow's own client, credentials from the environment: none, wrong, right
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(MlflowException, match="401|not authenticated"):
        MlflowClient(server.url).search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "mmflow")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="401|not authenticated"):
        MlflowClient(server.url).search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.users["mmflow"])
    assert "Default" in {e.name for e in MlflowClient(server.url).search_experiments()}


def test_no_secret_is_on_the_servers_command_lines(tracking_stack):
    """``ps`` shows every process's command line to every user of the host: the admin password,
    the S3 secret key and the database URIs reach MLflow in its environment only."""
    server = tracking_stack.server
    secrets = (server.users["admin"], tracking_stack.s3_env["AWS_SECRET_ACCESS_KEY"])
    lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == server.pgid:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    lines.append(f.read().replace(b"\0", b" ").decode())
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
    assert any("mlflow" in line and "server" in line for line in lines), lines
    assert not [x for x in lines if "postgresql" in x or any(s in x for s in secrets)], lines


PIPELINE = f"""
name: served
stages:
  synth:
    type: synth_shapes
    params: {{num_samples: 64, samples_per_shard: 64, image_size: 16}}  # one shard: one task
  vq:
    type: vqgan_train
    inputs: {{shards: synth}}
    params:
      model_cfg: {json.dumps(TINY_CFG)}
      holdout_fraction: 0.25
      eval_samples: 16
      preview: 4
      loss: {{disc_start: 2, disc_layers: 1, disc_channels: 8}}
      train: {{max_steps: 2, batch_size: 8, warmup_steps: 1, checkpoint_every: 2, eval_every: 2, log_every: 1}}
    resources: {{workers: 1, cpus: 1}}
"""


def test_a_pipeline_is_tracked_in_postgres_with_its_pictures_in_s3(
    tracking_stack, as_user, tmp_path
):
    """The pipeline runs in a process with no AWS_* variable at all, so every artifact it logs
    (pictures, the model) can only reach the bucket through the server's proxy."""
    import boto3
    from mlflow import MlflowClient

    stack, server = tracking_stack, as_user
    path = tmp_path / "served.yaml"
    path.write_text(PIPELINE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    env |= server.client_env()
    assert not {k for k in env if k.startswith("AWS_")}
    r = subprocess.run(
        [*MMFLOW, "run", str(path), "--storage", str(tmp_path / "store")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + server.log()[-2000:]

    # runs: one parent, a child per stage, through the server
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("served")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {x.data.tags["mmflow.stage"]: x for x in runs if x not in parents}
    assert set(children) == {"synth", "vq"}
    assert {x.data.tags["mlflow.parentRunId"] for x in children.values()} == {
        parents[0].info.run_id
    }
    vq = children["vq"].info.run_id
    assert "val_psnr" in children["vq"].data.metrics
    assert [m.step for m in client.get_metric_history(vq, "eval/psnr")] == [2]

    # pictures: listed and downloadable through the server, stored as objects in the bucket
    pictures = [a.path for a in client.list_artifacts(vq, "images/reconstructions")]
    assert pictures == ["images/reconstructions/step_000002.png"]
    local = client.download_artifacts(vq, pictures[0], str(tmp_path))
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    s3 = boto3.client("s3", endpoint_url=stack.s3_env["AWS_ENDPOINT_URL"], **_keys(stack))
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
        for o in page.get("Contents", [])
    ]
    assert f"mlflow/{exp.experiment_id}/{vq}/artifacts/{pictures[0]}" in keys, keys[:20]
    synth = children["synth"].info.run_id
    assert any(k.startswith(f"mlflow/{exp.experiment_id}/{synth}/artifacts/images/") for k in keys)

    # the registered model, downloaded through the server, loads
    version = client.get_model_version("served-vq", "1")
    assert version.run_id == vq
    _, preprocess, info = load_vqgan(download_registered("served-vq", 1, server.url))
    assert preprocess.image_size == 16 and info["steps"] == 2

    # and the store behind the server really is PostgreSQL
    count = stack.db.query(
        "SELECT count(*) FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id"
        " WHERE e.name = %s",
        ("served",),
    )
    assert count == [(3,)]
    assert ("served-vq",) in stack.db.query("SELECT name FROM registered_models")
    psnr = stack.db.query(
        "SELECT value FROM metrics WHERE run_uuid = %s AND key = 'val_psnr'", (vq,)
    )
    assert [v for (v,) in psnr] == [pytest.approx(children["vq"].data.metrics["val_psnr"])]
    users = {u for (u,) in stack.db.query("SELECT username FROM users", database="mlflow_auth")}
    assert users == {"admin", "mmflow"}


def _keys(stack) -> dict[str, str]:
    e = stack.s3_env
    return {
        "aws_access_key_id": e["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": e["AWS_SECRET_ACCESS_KEY"],
        "region_name": e["AWS_REGION"],
    }
