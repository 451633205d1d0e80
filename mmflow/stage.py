"""The stage contract.

A stage type is a class (checked by ``@register``; found by name through the
``mmflow.stages`` entry points, see :mod:`mmflow.plugins`). It declares:

- ``Params``: a pydantic model (unknown keys rejected, types checked at load);
- ``inputs`` / ``outputs``: name -> kind (``shards``, ``table``, ``model`` ...);
- ``resources``: default cpus / gpus / workers, overridable per pipeline;
- ``version``: bumped when the stage's code changes what it produces
  (part of the fingerprint, so a bump invalidates cached outputs).

``run(ctx)`` holds only the work. Everything else (where outputs go, the
fingerprint, the commit, MLflow) is the runner's, reached through ``ctx``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from mmflow.params import Params
from mmflow.storage import Storage, join

KINDS = ("shards", "table", "model", "tokenizer")
MANIFEST = "_MANIFEST.json"


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus: float = 1.0  # per task / actor / training worker
    gpus: float = 0.0  # per task / actor / training worker
    workers: int = 1  # parallel tasks, actor-pool size or training workers
    # How tasks and training workers are placed on a multi-node cluster (Ray's placement
    # strategies): PACK fills a node first (Ray's default scheduling for shard tasks, Ray
    # Train's PACK for workers); SPREAD puts them on as many nodes as it can; STRICT_* must.
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def shard_tasks(self) -> dict[str, Any]:
        """What these resources mean for ``map_shards``: CPUs per task, tasks at once, spread."""
        spread = self.placement in ("SPREAD", "STRICT_SPREAD")
        return {"cpus": self.cpus, "max_in_flight": self.workers or None, "spread": spread}


@dataclass(frozen=True)
class Dataset:
    """A committed output of an upstream stage, as a downstream stage sees it."""

    stage: str
    output: str
    kind: str
    uri: str
    fingerprint: str
    manifest: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        """What the producing stage recorded about this output (counts, files, ...)."""
        return self.manifest["outputs"][self.output]


@dataclass
class StageContext:
    """What a running stage may see and do. Built by the runner."""

    pipeline: str
    stage: str
    params: Any
    resources: Resources
    inputs: dict[str, Dataset]
    outputs: dict[str, str]  # output name -> URI to write into
    work_uri: str  # private scratch (checkpoints, shard markers); removed at commit
    storage: Storage
    tracking_uri: str
    run_id: str | None
    output_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    _log_metrics: Callable[[dict[str, float], int | None], None] | None = None
    _log_image: Callable[[Any, str], None] | None = None
    _log_artifact: Callable[[str, str | None], None] | None = None

    def record_output(self, name: str, **info: Any) -> None:
        """Counts and facts about an output, stored in its manifest (e.g. ``num_samples``)."""
        if name not in self.outputs:
            raise KeyError(f"stage {self.stage!r} has no output {name!r}")
        self.output_info.setdefault(name, {}).update(info)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics go to MLflow; the last value of each is kept in the manifest for ``status``."""
        clean = {k: float(v) for k, v in metrics.items()}
        if step is None:
            self.metrics.update(clean)
        if self._log_metrics:
            self._log_metrics(clean, step)

    def log_image(self, image: Any, name: str) -> None:
        if self._log_image:
            self._log_image(image, name)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self._log_artifact:
            self._log_artifact(local_path, artifact_path)

    def work(self, *parts: str) -> str:
        return join(self.work_uri, *parts)


class Stage:
    type: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    inputs: ClassVar[dict[str, str]] = {}
    optional_inputs: ClassVar[frozenset[str]] = frozenset()  # inputs a pipeline may leave unwired
    outputs: ClassVar[dict[str, str]] = {}
    resources: ClassVar[Resources] = Resources()
    # True: what an interrupted attempt left in the outputs and ``_work`` is kept for the next
    # attempt, which resumes from it (finished shards, checkpoints). False: the runner empties
    # them before every attempt, so nothing half-done mixes into the new output.
    resumable: ClassVar[bool] = False

    @classmethod
    def check_wiring(cls, params: Params, wired: set[str]) -> list[tuple[str, str]]:
        """(field, problem) pairs for params and wired inputs that do not fit together, such as
        a model both wired as an input and named in params; checked when the pipeline loads."""
        return []

    def run(self, ctx: StageContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def check_stage_type(cls: type[Stage]) -> list[str]:
    """What is wrong with a stage type's declaration (empty when nothing is)."""
    name = getattr(cls, "type", None) or cls.__name__
    problems = [
        f"stage type {name!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})"
        for kind in [*cls.inputs.values(), *cls.outputs.values()]
        if kind not in KINDS
    ]
    if not cls.optional_inputs <= set(cls.inputs):
        problems.append(f"stage type {name!r}: optional inputs must be among its inputs")
    if not getattr(cls, "type", None):
        problems.append(f"stage class {cls.__qualname__}: no `type` name")
    return problems


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: check a stage type's declaration when its module is imported.

    Registration by name is not done here: stage types are found through the
    ``mmflow.stages`` entry points (or ``package.module:Class`` in YAML), see
    :mod:`mmflow.plugins`, so importing this contract imports no stage."""
    problems = check_stage_type(cls)
    if problems:
        raise ValueError("; ".join(problems))
    return cls


def output_uri(storage_root: str, pipeline: str, stage: str, fingerprint: str) -> str:
    return join(storage_root, pipeline, stage, fingerprint)
