"""Planning without running: fingerprints, where outputs are, each stage's state, what
``--only`` / ``--from`` select, and the command that resumes a run. Pure reads of storage:
no Ray, no torch, no MLflow."""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from mmflow.config import PipelineConfig, StageConfig
from mmflow.redact import redact_uri
from mmflow.stage import MANIFEST, output_uri
from mmflow.storage import Storage, join, normalize

FAILED = "_FAILED.json"
LATEST = "_LATEST.json"
STATES = ("done", "stale", "missing", "failed")


class SelectionError(ValueError):
    """``--only`` / ``--from`` asked for something that cannot run."""


def fingerprint(cfg: StageConfig, upstream: dict[str, str]) -> str:
    """Hash of stage type, code version, params and the fingerprints of the inputs."""
    payload = {
        "type": cfg.type,
        "version": cfg.stage_type.version,
        "params": cfg.params.model_dump(mode="json"),
        "inputs": {
            name: f"{ref.output}@{upstream[ref.stage]}" for name, ref in sorted(cfg.inputs.items())
        },
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageStatus:
    name: str
    type: str
    state: str
    fingerprint: str
    output: str | None
    mlflow_run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # output name -> committed URI

    def to_json(self) -> dict[str, Any]:
        keys = ("name", "type", "state", "fingerprint", "output", "outputs", "mlflow_run_id")
        d = {k: getattr(self, k) for k in (*keys, "metrics")}
        if self.error:
            d["error"] = self.error
        return d


class Plan:
    """A loaded pipeline against its storage: fingerprints and states."""

    def __init__(self, pipeline: PipelineConfig, storage: Storage | None = None):
        self.p = pipeline
        self.storage = storage or Storage()
        self.root = normalize(pipeline.storage)
        self.fingerprints: dict[str, str] = {}
        for name, cfg in pipeline.stages.items():
            self.fingerprints[name] = fingerprint(cfg, self.fingerprints)

    # ---- where things are -------------------------------------------------
    def uri(self, stage: str) -> str:
        return output_uri(self.root, self.p.name, stage, self.fingerprints[stage])

    def manifest(self, stage: str) -> dict[str, Any] | None:
        return self.storage.read_json_if_exists(join(self.uri(stage), MANIFEST))

    def status(self) -> list[StageStatus]:
        return [self._status(name, cfg) for name, cfg in self.p.stages.items()]

    def _status(self, name: str, cfg: StageConfig) -> StageStatus:
        fp, uri = self.fingerprints[name], self.uri(name)
        man = self.manifest(name)
        if man is not None:
            return _row(name, cfg.type, "done", fp, uri, man)
        failed = self.storage.read_json_if_exists(join(uri, FAILED))
        if failed is not None:
            row = StageStatus(name, cfg.type, "failed", fp, None, failed.get("mlflow_run_id"))
            row.error = failed.get("error")
            return row
        latest = self.storage.read_json_if_exists(join(self.root, self.p.name, name, LATEST))
        old = latest and self.storage.read_json_if_exists(join(latest["output"], MANIFEST))
        if old:
            return _row(name, cfg.type, "stale", fp, latest["output"], old)
        return StageStatus(name, cfg.type, "missing", fp, None, None)

    # ---- what to run --------------------------------------------------------
    def select(self, only: list[str] | None = None, from_stage: str | None = None) -> list[str]:
        names = list(self.p.stages)
        for n in [*(only or []), *([from_stage] if from_stage else [])]:
            if n not in self.p.stages:
                raise SelectionError(f"{self.p.path}: no stage {n!r} (stages: {', '.join(names)})")
        if only:
            chosen = [n for n in names if n in only]
        elif from_stage:
            chosen = [from_stage]
            for n in names:  # DAG order: a stage follows all of its inputs
                ups = {r.stage for r in self.p.stages[n].inputs.values()}
                if ups & set(chosen) and n not in chosen:
                    chosen.append(n)
            chosen = [n for n in names if n in chosen]
        else:
            return names
        for n in chosen:
            for ref in self.p.stages[n].inputs.values():
                if ref.stage not in chosen and self.manifest(ref.stage) is None:
                    raise SelectionError(
                        f"stage {n!r} needs the output of {ref.stage!r}, which has no committed output "
                        f"for fingerprint {self.fingerprints[ref.stage]}; run it first "
                        f"(mmflow run {self.p.path} --only {ref.stage}) or drop --only/--from"
                    )
        return chosen

    def resume_command(self, only: list[str] | None, from_stage: str | None) -> str:
        args = ["mmflow", "run", self.p.path]
        if only:
            args += ["--only", ",".join(only)]
        if from_stage:
            args += ["--from", from_stage]
        for s in self.p.overrides:
            args += ["--set", s]
        args += ["--storage", redact_uri(self.p.storage)]
        args += ["--tracking-uri", redact_uri(self.p.tracking_uri)]
        return shlex.join(args)


def _row(name: str, type_: str, state: str, fp: str, uri: str, man: dict) -> StageStatus:
    outputs = {o: info["uri"] for o, info in man.get("outputs", {}).items()}
    run = man.get("mlflow_run_id")
    return StageStatus(name, type_, state, fp, uri, run, man.get("metrics", {}), None, outputs)
