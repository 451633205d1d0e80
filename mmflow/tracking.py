"""MLflow conventions.

- one experiment per pipeline (named after it);
- one parent run per ``mmflow run`` invocation, tagged with the command line;
- one child run per executed stage (``mlflow.parentRunId`` = the parent), holding
  the stage's params, fingerprint, input and output URIs, counts, durations,
  metrics and pictures;
- a cache hit is a tag on the parent, ``mmflow.cached.<stage>``, whose value is
  the id of the run that produced the output.

Only the driver and rank 0 of a training job write here; they talk to the store
through ``MlflowClient`` with explicit run ids, so any process can log to the
stage's run given ``(tracking_uri, run_id)``.

Every tag and param value passes through ``redact_uri`` on its way in, so a URI with a
password or a signed query (``postgresql://u:pw@db``, ``?X-Amz-Signature=``) is stored with
those parts masked: anyone who can read the tracking server sees no credentials.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from typing import Any

from mmflow.redact import redact_uri
from mmflow.storage import is_remote

log = logging.getLogger(__name__)

TAG_PIPELINE = "mmflow.pipeline"
TAG_STAGE = "mmflow.stage"
TAG_STAGE_TYPE = "mmflow.stage_type"
TAG_FINGERPRINT = "mmflow.fingerprint"
TAG_OUTPUT = "mmflow.output"
TAG_COMMAND = "mmflow.command"
TAG_CACHED_PREFIX = "mmflow.cached."


def _client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested params -> ``a.b.c`` keys, as MLflow params are flat strings."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]
    return out


class Tracker:
    """The runner's handle on one pipeline invocation in MLflow."""

    def __init__(self, tracking_uri: str, pipeline: str):
        self.tracking_uri = tracking_uri
        self.pipeline = pipeline
        # no mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI in os.environ, which would
        # then override the next pipeline's own store in this process (see load_pipeline)
        self.client = _client(tracking_uri)
        exp = self.client.get_experiment_by_name(pipeline)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(pipeline)
        self.parent_id: str | None = None

    def start_parent(self, command: str, params: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.pipeline}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={TAG_PIPELINE: self.pipeline, TAG_COMMAND: redact_uri(command)},
        )
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_stage(self, stage: str, stage_type: str, fingerprint: str, output: str) -> str:
        tags = {
            TAG_PIPELINE: self.pipeline,
            TAG_STAGE: stage,
            TAG_STAGE_TYPE: stage_type,
            TAG_FINGERPRINT: fingerprint,
            TAG_OUTPUT: redact_uri(output),
        }
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        return run.info.run_id

    def record_cache_hit(self, stage: str, source_run_id: str | None) -> None:
        if self.parent_id:
            self.client.set_tag(
                self.parent_id, TAG_CACHED_PREFIX + stage, source_run_id or "unknown"
            )

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact_uri(v) if isinstance(v, str) else v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_inputs(self, run_id: str, inputs: dict[str, tuple[str, str]]) -> None:
        """Record each upstream output as an ``mlflow.data`` dataset: name -> (uri, fingerprint)."""
        try:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset
            from mlflow.entities import DatasetInput, InputTag

            datasets = []
            for name, (uri, fingerprint) in inputs.items():
                uri = redact_uri(uri)
                with warnings.catch_warnings():  # local paths match two equivalent source types
                    warnings.simplefilter("ignore", UserWarning)
                    source = resolve_dataset_source(uri if is_remote(uri) else os.path.abspath(uri))
                entity = MetaDataset(
                    source=source, name=name, digest=fingerprint[:36]
                )._to_mlflow_entity()
                datasets.append(
                    DatasetInput(entity, tags=[InputTag("mlflow.data.context", "input")])
                )
            if datasets:
                self.client.log_inputs(run_id, datasets=datasets)
        except Exception as e:  # dataset lineage is a nicety; never fail a stage over it
            log.warning("could not log input datasets to MLflow: %s", redact_uri(str(e)))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


def log_metrics(
    tracking_uri: str, run_id: str, metrics: dict[str, float], step: int | None = None
) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    client = _client(tracking_uri)
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_image(tracking_uri: str, run_id: str, image: Any, name: str) -> None:
    """A PIL image or numpy array as ``images/<name>.png``."""
    _client(tracking_uri).log_image(run_id, image, artifact_file=f"images/{name}.png")


def log_artifact(
    tracking_uri: str, run_id: str, local_path: str, artifact_path: str | None = None
) -> None:
    _client(tracking_uri).log_artifact(run_id, local_path, artifact_path)


def log_text(tracking_uri: str, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text)
        log_artifact(tracking_uri, run_id, path)
