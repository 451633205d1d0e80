"""The VQ-GAN as an MLflow model: logged from a ``vqgan_train`` output folder, registered in the
model registry, and loaded back from it (what ``mmflow decode`` falls back on when the folder
is gone). Explicit ``MlflowClient`` calls only: the fluent API's ``set_tracking_uri`` would set
MLFLOW_TRACKING_URI for everything else in the process."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmflow.stage import StageContext


def log_and_register(ctx: StageContext, model_uri: str, name: str | None) -> dict[str, Any]:
    """From the driver: the model folder as the run's ``model/`` artifact, an MLflow pytorch model
    as ``vqgan/`` (``mlflow.pytorch.load_model`` reads it), registered as ``name`` when given.
    Returns what to record."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mmflow.io.cache import materialize
    from mmflow.models.vqgan import CONFIG_FILE, load_vqgan

    with tempfile.TemporaryDirectory(prefix="mmflow-vqgan-") as tmp:
        local = materialize(model_uri, ctx.storage)  # the folder `model`, logged under its name
        ctx.log_artifact(local)
        if not ctx.run_id:
            return {}
        model, _, _ = load_vqgan(local)
        mlflow.pytorch.save_model(
            model,
            os.path.join(tmp, "vqgan"),
            serialization_format="pickle",  # pt2 would trace forward with an example input
            code_paths=[_model_code(tmp)],  # loads where mmflow is not installed
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            extra_files=[os.path.join(local, CONFIG_FILE)],
        )
        client = MlflowClient(ctx.tracking_uri)
        client.log_artifacts(ctx.run_id, os.path.join(tmp, "vqgan"), "vqgan")
    out: dict[str, Any] = {"mlflow_model_uri": f"runs:/{ctx.run_id}/vqgan"}
    if name:
        try:
            client.create_registered_model(name, description="mmflow VQ-GAN image tokenizer")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, out["mlflow_model_uri"], run_id=ctx.run_id)
        out.update(registered_model=name, registered_version=int(version.version))
    return out


def _model_code(tmp: str) -> str:
    """A copy of the modules the pickled model needs (``mmflow.models.vqgan``: torch only)."""
    import mmflow

    root = os.path.dirname(mmflow.__file__)
    dst = os.path.join(tmp, "code", "mmflow")
    for rel in ("__init__.py", "models/__init__.py", "models/vqgan.py"):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy(os.path.join(root, rel), os.path.join(dst, rel))
    return dst


def load_registered_vqgan(name: str, version: str | int, tracking_uri: str, device: str = "cpu"):
    """A VQ-GAN from the MLflow model registry at ``tracking_uri``, by explicit URIs only (no
    process-wide ``mlflow.set_tracking_uri``)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(name, str(version))  # runs:/<run>/vqgan
    local = mlflow.artifacts.download_artifacts(source, tracking_uri=tracking_uri)
    return mlflow.pytorch.load_model(local, map_location=device).to(device).eval()
