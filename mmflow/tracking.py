"""MLflow conventions.

- one experiment per pipeline (named after it);
- one parent run per ``mmflow run`` invocation, tagged with the command line;
- one child run per executed stage (``mlflow.parentRunId`` = the parent), holding
  the stage's params, fingerprint, input and output URIs, counts, durations,
  metrics and pictures;
- a cache hit is a tag on the parent, ``mmflow.cached.<stage>``, whose value is
  the id of the run that produced the output;
- the parent is named after what it did (``quickstart: clip_train, vqgan_train (+5 cached)``),
  renamed as stages run; a child is named after its stage;
- every run carries MLflow's source tags, which its runs table shows as Source and Version:
  the pipeline file, and the git commit of the checkout holding it (else mmflow's version);
- a training stage's run (one that outputs a model) logs MLflow's system metrics (CPU, memory,
  disk, network; GPU where ``pynvml`` finds one) every 10 s, sampled in the driver's process:
  the machine ``mmflow run`` runs on, which is the training machine on a single machine;
- the experiment is tagged as MLflow's model-training kind (``mlflow.experimentKind``).

Only the driver and rank 0 of a training job write here; they talk to the store
through ``MlflowClient`` with explicit run ids, so any process can log to the
stage's run given ``(tracking_uri, run_id)``.

Every tag and param value passes through ``redact_uri`` on its way in, so a URI with a
password or a signed query (``postgresql://u:pw@db``, ``?X-Amz-Signature=``) is stored with
those parts masked: anyone who can read the tracking server sees no credentials.
"""

from __future__ import annotations

import contextlib
import getpass
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
TAG_VERSION = "mmflow.version"
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
SYSTEM_METRICS_INTERVAL_S = 10.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


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


def experiment_id(client, pipeline: str) -> str:
    """The pipeline's experiment (created if missing), tagged as MLflow's model-training kind."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(pipeline)
    if exp is None:
        try:
            return client.create_experiment(pipeline, tags={EXPERIMENT_KIND: MODEL_TRAINING})
        except MlflowException:
            # two runs of a new pipeline started together: the other one created it first
            exp = client.get_experiment_by_name(pipeline)
            if exp is None:
                raise
            return exp.experiment_id
    if EXPERIMENT_KIND not in exp.tags:  # made before mmflow tagged it; a user's choice stays
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return exp.experiment_id


def ui_url(tracking_uri: str, base: str, pipeline: str | None) -> str:
    """Where MLflow's UI shows the pipeline's runs in its model-training view: through
    ``mmflow ui``'s page that makes the view the browser's choice (``mmflow/ui_app.py``; MLflow
    3.17 opens an experiment on its GenAI overview unless the URL or that choice says
    ``workflowType=machine_learning``)."""
    from urllib.parse import quote

    view = "?workflowType=machine_learning"
    route = "/experiments"
    if pipeline is not None:
        route += f"/{experiment_id(_client(tracking_uri), pipeline)}/runs"
    return f"{base}/mmflow/open?to={quote(route + view, safe='')}"


def source_tags(pipeline_file: str | None) -> dict[str, str]:
    """MLflow's source tags: the pipeline file as Source, its checkout's commit as Version."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit

    from mmflow import __version__

    tags = {"mlflow.source.type": "LOCAL", TAG_VERSION: __version__}
    commit = None
    if pipeline_file:
        path = os.path.abspath(pipeline_file)
        tags["mlflow.source.name"] = redact_uri(path)
        commit = get_git_commit(path)
        branch = get_git_branch(path) if commit else None
        if branch:
            tags["mlflow.source.git.branch"] = branch
    tags["mlflow.source.git.commit"] = commit or __version__
    with contextlib.suppress(KeyError, OSError):  # no name for this uid (some containers)
        tags["mlflow.user"] = getpass.getuser()
    return tags


def parent_run_name(
    pipeline: str, executed: list[str], cached: list[str], status: str = "RUNNING"
) -> str:
    """``quickstart: clip_train, vqgan_train (+5 cached)``, ``quickstart: all 7 cached``."""
    if executed:
        what = ", ".join(executed if len(executed) <= 4 else executed[:3])
        what += f" and {len(executed) - 3} more" if len(executed) > 4 else ""
        what += f" (+{len(cached)} cached)" if cached else ""
    else:
        what = f"all {len(cached)} cached" if cached else "nothing run"
    if status == "FAILED" and executed:
        what += f", failed at {executed[-1]}"
    elif status in ("FAILED", "KILLED"):
        what += f", {status.lower()}"
    return f"{pipeline}: {what}"


def _system_metrics(tracking_uri: str, run_id: str):
    """MLflow's own system-metrics monitor on ``run_id`` (a thread in this process), or None.
    ``mlflow.enable_system_metrics_logging`` only reaches runs opened by ``mlflow.start_run``;
    these are opened through the client, so the monitor is started here. Off with
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as ENABLED

    if ENABLED.defined and not ENABLED.get():
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its start, stop and "no GPU" notes are INFO lines on every training stage otherwise
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=tracking_uri
        )
        monitor.start()
        return monitor
    except Exception as e:  # a nicety, like dataset lineage: never fail a stage over it
        log.warning("no system metrics for run %s: %s", run_id, redact_uri(str(e)))
        return None


class Tracker:
    """The runner's handle on one pipeline invocation in MLflow."""

    def __init__(self, tracking_uri: str, pipeline: str, pipeline_file: str | None = None):
        self.tracking_uri = tracking_uri
        self.pipeline = pipeline
        # no mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI in os.environ, which would
        # then override the next pipeline's own store in this process (see load_pipeline)
        self.client = _client(tracking_uri)
        self.experiment_id = experiment_id(self.client, pipeline)
        self.source = source_tags(pipeline_file)
        self.parent_id: str | None = None
        self.executed: list[str] = []
        self.cached: list[str] = []
        self._monitors: dict[str, Any] = {}  # run id -> its system-metrics monitor

    def start_parent(self, command: str, params: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=parent_run_name(self.pipeline, [], []),
            tags={**self.source, TAG_PIPELINE: self.pipeline, TAG_COMMAND: redact_uri(command)},
        )
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def _rename_parent(self, status: str = "RUNNING") -> None:
        if self.parent_id:
            name = parent_run_name(self.pipeline, self.executed, self.cached, status)
            self.client.update_run(self.parent_id, name=name)

    def start_stage(
        self,
        stage: str,
        stage_type: str,
        fingerprint: str,
        output: str,
        system_metrics: bool = False,
    ) -> str:
        tags = {
            **self.source,
            TAG_PIPELINE: self.pipeline,
            TAG_STAGE: stage,
            TAG_STAGE_TYPE: stage_type,
            TAG_FINGERPRINT: fingerprint,
            TAG_OUTPUT: redact_uri(output),
        }
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        run_id = self.client.create_run(self.experiment_id, run_name=stage, tags=tags).info.run_id
        self.executed.append(stage)
        self._rename_parent()
        if system_metrics and (monitor := _system_metrics(self.tracking_uri, run_id)):
            self._monitors[run_id] = monitor
        return run_id

    def record_cache_hit(self, stage: str, source_run_id: str | None) -> None:
        self.cached.append(stage)
        if self.parent_id:
            self.client.set_tag(
                self.parent_id, TAG_CACHED_PREFIX + stage, source_run_id or "unknown"
            )
            self._rename_parent()

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
        # the monitor flushes what it sampled before the run closes; the parent's end also stops
        # those of stages whose own end was never reached (an MLflow error after a commit)
        ending = [run_id] + (list(self._monitors) if run_id == self.parent_id else [])
        for rid in ending:
            if monitor := self._monitors.pop(rid, None):
                monitor.finish()
        if run_id == self.parent_id:
            self._rename_parent(status)
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
