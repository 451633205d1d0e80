"""Any model folder into MLflow: logged, registered, downloaded back; nothing unpickled."""

from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient

from mmflow.export.mlflow import download_registered, publish_model


@pytest.fixture
def run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("export", artifact_location=str(tmp_path / "artifacts"))
    return uri, client.create_run(exp).info.run_id


def _folder(tmp_path, value: int) -> str:
    folder = tmp_path / f"model-{value}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"value": value}))
    (folder / "weights.bin").write_bytes(bytes(range(256)) * value)
    return str(folder)


def test_a_folder_is_logged_registered_and_comes_back_whole(run, tmp_path):
    uri, run_id = run
    out = publish_model(_folder(tmp_path, 3), uri, run_id, "exp-model", "a test model")
    assert out == {
        "mlflow_model_uri": f"runs:/{run_id}/model",
        "registered_model": "exp-model",
        "registered_version": 1,
    }
    local = download_registered("exp-model", 1, uri)
    assert sorted(os.listdir(local)) == ["config.json", "weights.bin"]
    assert json.load(open(os.path.join(local, "config.json"))) == {"value": 3}
    assert open(os.path.join(local, "weights.bin"), "rb").read() == bytes(range(256)) * 3
    version = MlflowClient(uri).get_model_version("exp-model", "1")
    assert version.run_id == run_id and version.description == "a test model"


def test_a_second_version_of_the_same_name(run, tmp_path):
    uri, run_id = run
    publish_model(_folder(tmp_path, 1), uri, run_id, "exp-model", artifact_path="m1")
    out = publish_model(_folder(tmp_path, 2), uri, run_id, "exp-model", artifact_path="m2")
    assert out["registered_version"] == 2
    local = download_registered("exp-model", 2, uri)
    assert json.load(open(os.path.join(local, "config.json"))) == {"value": 2}


def test_without_a_run_or_a_name(run, tmp_path):
    uri, run_id = run
    assert publish_model(_folder(tmp_path, 1), uri, None, "x") == {}
    out = publish_model(_folder(tmp_path, 2), uri, run_id)
    assert out == {"mlflow_model_uri": f"runs:/{run_id}/model"}
    assert MlflowClient(uri).search_registered_models() == []
