"""Any model folder a stage wrote, as an MLflow artifact and a registered model version.

The folder is logged as it is (weights in safetensors or plain state dicts, configs in
JSON), and the registry version points at it (``runs:/<run>/<artifact_path>``). Loading a
version back downloads that folder and hands it to the family's own loader, which reads
weights only: nothing from the registry is ever unpickled, so registering a model version
on a shared server gives no way to run code on whoever loads it.

Explicit ``MlflowClient`` calls only: the fluent API's ``set_tracking_uri`` would set
MLFLOW_TRACKING_URI for everything else in the process.
"""

from __future__ import annotations

from typing import Any

from mmflow.io.cache import materialize
from mmflow.storage import Storage


def publish_model(
    model_uri: str,
    tracking_uri: str,
    run_id: str | None,
    registered_name: str | None = None,
    description: str = "",
    artifact_path: str = "model",
    storage: Storage | None = None,
) -> dict[str, Any]:
    """Log the folder at ``model_uri`` to ``run_id`` as ``artifact_path``; register it as
    ``registered_name`` when given. Returns what to record in the output's manifest."""
    if not run_id:
        return {}
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    client.log_artifacts(run_id, materialize(model_uri, storage), artifact_path)
    out: dict[str, Any] = {"mlflow_model_uri": f"runs:/{run_id}/{artifact_path}"}
    if registered_name:
        try:
            client.create_registered_model(registered_name, description=description)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            registered_name, out["mlflow_model_uri"], run_id=run_id, description=description
        )
        out.update(registered_model=registered_name, registered_version=int(version.version))
    return out


def download_registered(name: str, version: str | int, tracking_uri: str) -> str:
    """A local copy of the folder behind registered model ``name`` version ``version``."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(name, str(version))  # runs:/<run>/model
    return mlflow.artifacts.download_artifacts(source, tracking_uri=tracking_uri)
