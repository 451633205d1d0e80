"""The runner: fingerprints, plan, cache, placement on Ray, atomic commit, tracking.

Storage layout of a pipeline (see docs/architecture.md)::

    {storage}/{pipeline}/{stage}/{fingerprint}/
        {output}/...          one folder per declared output
        _work/                private scratch (checkpoints, markers); removed at commit
        _FAILED.json          the last attempt's error (removed when it is retried)
        _MANIFEST.json        written last: its presence *is* the commit
    {storage}/{pipeline}/{stage}/_LATEST.json   pointer to the newest committed fingerprint
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from mmflow.config import PipelineConfig, StageConfig
from mmflow.stage import MANIFEST, Dataset, StageContext, output_uri
from mmflow.storage import Storage, join, normalize

FAILED = "_FAILED.json"
LATEST = "_LATEST.json"
STATES = ("done", "stale", "missing", "failed")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException, resume: str):
        self.stage, self.cause, self.resume = stage, cause, resume
        super().__init__(f"stage {stage!r} failed: {cause}")


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

    def to_json(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in ("name", "type", "state", "fingerprint", "output", "mlflow_run_id", "metrics")
        }
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class RunReport:
    parent_run_id: str | None
    executed: list[str]
    cached: list[str]


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # address="local": always a fresh local instance, never a stale `ray start` cluster
        # recorded in /tmp/ray (set RAY_ADDRESS=auto to join a local `ray start` on purpose).
        # No dashboard (memory, start-up time), hence no state API: see gcs_actor_liveness.
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={"worker_process_setup_hook": "mmflow.runner.gcs_actor_liveness"},
        )


def gcs_actor_liveness() -> None:
    """In each worker of the local, dashboard-less Ray. Ray Train's placement-group cleaner asks
    the state API (served by the dashboard) once a second whether the training controller is
    alive; without a dashboard every ask fails, with a warning or a traceback, and the cleaner
    never cleans. Here it asks the GCS directly, which every Ray has. Should Ray's internals
    move, the cleaner is left as it was, with its logger muted."""
    import logging

    try:
        import ray._private.state as gcs_state
        from ray.train.v2._internal.execution.controller import placement_group_cleaner

        def is_actor_alive(actor_id: str, timeout: float | None = None) -> bool:
            info = gcs_state.actors(actor_id=actor_id)
            return bool(info) and info.get("State") != "DEAD"

        placement_group_cleaner.is_actor_alive = is_actor_alive
    except Exception:
        name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
        logging.getLogger(name).setLevel(logging.ERROR)


class Runner:
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
        out = []
        for name, cfg in self.p.stages.items():
            fp, uri = self.fingerprints[name], self.uri(name)
            man = self.manifest(name)
            if man is not None:
                out.append(
                    StageStatus(
                        name,
                        cfg.type,
                        "done",
                        fp,
                        uri,
                        man.get("mlflow_run_id"),
                        man.get("metrics", {}),
                    )
                )
                continue
            failed = self.storage.read_json_if_exists(join(uri, FAILED))
            if failed is not None:
                out.append(
                    StageStatus(
                        name,
                        cfg.type,
                        "failed",
                        fp,
                        None,
                        failed.get("mlflow_run_id"),
                        {},
                        failed.get("error"),
                    )
                )
                continue
            latest = self.storage.read_json_if_exists(join(self.root, self.p.name, name, LATEST))
            old = latest and self.storage.read_json_if_exists(join(latest["output"], MANIFEST))
            if old:
                out.append(
                    StageStatus(
                        name,
                        cfg.type,
                        "stale",
                        fp,
                        latest["output"],
                        old.get("mlflow_run_id"),
                        old.get("metrics", {}),
                    )
                )
            else:
                out.append(StageStatus(name, cfg.type, "missing", fp, None, None))
        return out

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
                if (
                    any(r.stage in chosen for r in self.p.stages[n].inputs.values())
                    and n not in chosen
                ):
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
        args += ["--storage", self.p.storage, "--tracking-uri", self.p.tracking_uri]
        return shlex.join(args)

    # ---- running --------------------------------------------------------------
    def run(
        self,
        only: list[str] | None = None,
        from_stage: str | None = None,
        force: bool = False,
        command: str = "",
    ) -> RunReport:
        from mmflow.tracking import Tracker, flatten

        chosen = self.select(only, from_stage)
        tracker = Tracker(self.p.tracking_uri, self.p.name)
        parent = tracker.start_parent(
            command or shlex.join(sys.argv),
            flatten(
                "",
                {
                    "pipeline_file": self.p.path,
                    "storage": self.root,
                    "overrides": self.p.overrides,
                    "stages": {n: self.fingerprints[n] for n in chosen},
                },
                {},
            ),
        )
        report = RunReport(parent, [], [])
        try:
            for name in chosen:
                man = self.manifest(name)
                if man is not None and not force:
                    print(f"[mmflow] {name}: cached ({self.fingerprints[name]})", flush=True)
                    tracker.record_cache_hit(name, man.get("mlflow_run_id"))
                    report.cached.append(name)
                    continue
                ensure_ray()
                self._execute(name, tracker)
                report.executed.append(name)
        except StageFailed as e:
            tracker.end(parent, "FAILED")
            e.resume = self.resume_command(only, from_stage)
            raise
        except BaseException:
            tracker.end(parent, "KILLED")
            raise
        tracker.end(parent)
        return report

    def _execute(self, name: str, tracker) -> None:
        from mmflow import tracking
        from mmflow.tracking import flatten

        cfg, fp, uri, st = (
            self.p.stages[name],
            self.fingerprints[name],
            self.uri(name),
            self.storage,
        )
        st.makedirs(uri)
        st.delete(join(uri, FAILED))
        leftovers = st.remove_temporaries(uri)
        inputs = {}
        for iname, ref in cfg.inputs.items():
            man = self.manifest(ref.stage)
            if man is None:
                raise StageFailed(
                    name,
                    RuntimeError(f"input {iname!r}: {ref.stage!r} has no committed output"),
                    "",
                )
            inputs[iname] = Dataset(
                ref.stage,
                ref.output,
                man["outputs"][ref.output]["kind"],
                man["outputs"][ref.output]["uri"],
                man["fingerprint"],
                man,
            )
        run_id = tracker.start_stage(name, cfg.type, fp, uri)
        tracker.log_params(
            run_id,
            flatten(
                "",
                {
                    "params": cfg.params.model_dump(mode="json"),
                    "resources": cfg.resources.model_dump(),
                    "fingerprint": fp,
                    "code_version": cfg.stage_type.version,
                    "output_uri": uri,
                    "inputs": {k: v.uri for k, v in inputs.items()},
                },
                {},
            ),
        )
        tracker.log_inputs(run_id, {k: (v.uri, v.fingerprint) for k, v in inputs.items()})
        turi = self.p.tracking_uri
        ctx = StageContext(
            pipeline=self.p.name,
            stage=name,
            params=cfg.params,
            resources=cfg.resources,
            inputs=inputs,
            outputs={o: join(uri, o) for o in cfg.stage_type.outputs},
            work_uri=join(uri, "_work"),
            storage=st,
            tracking_uri=turi,
            run_id=run_id,
            _log_metrics=lambda m, step: tracking.log_metrics(turi, run_id, m, step),
            _log_image=lambda img, n: tracking.log_image(turi, run_id, img, n),
            _log_artifact=lambda path, ap: tracking.log_artifact(turi, run_id, path, ap),
        )
        print(
            f"[mmflow] {name}: running {cfg.type} -> {uri}"
            + (f" (removed {leftovers} partial files of an earlier attempt)" if leftovers else ""),
            flush=True,
        )
        t0 = time.time()
        try:
            cfg.stage_type().run(ctx)
            missing = [o for o, ouri in ctx.outputs.items() if not st.exists(ouri)]
            if missing:
                raise RuntimeError(f"stage wrote no output {', '.join(missing)} under {uri}")
        except BaseException as e:
            st.write_json(
                join(uri, FAILED),
                {
                    "error": f"{type(e).__name__}: {e}",
                    "mlflow_run_id": run_id,
                    "traceback": traceback.format_exc(),
                    "time": time.time(),
                },
            )
            tracker.end(run_id, "FAILED" if isinstance(e, Exception) else "KILLED")
            if isinstance(e, Exception):
                raise StageFailed(name, e, "") from e
            raise
        duration = time.time() - t0
        st.delete(ctx.work_uri)
        st.remove_temporaries(uri)
        outputs = {
            o: {"kind": cfg.stage_type.outputs[o], "uri": ouri, **ctx.output_info.get(o, {})}
            for o, ouri in ctx.outputs.items()
        }
        counts = {
            f"{o}.{k}": v
            for o, info in ctx.output_info.items()
            for k, v in info.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        ctx.log_metrics({"duration_s": duration, **counts})
        st.write_json(
            join(uri, MANIFEST),
            {
                "pipeline": self.p.name,
                "stage": name,
                "type": cfg.type,
                "fingerprint": fp,
                "code_version": cfg.stage_type.version,
                "params": cfg.params.model_dump(mode="json"),
                "inputs": {
                    k: {
                        "stage": v.stage,
                        "output": v.output,
                        "uri": v.uri,
                        "fingerprint": v.fingerprint,
                    }
                    for k, v in inputs.items()
                },
                "outputs": outputs,
                "metrics": ctx.metrics,
                "mlflow_run_id": run_id,
                "duration_s": duration,
                "committed_at": time.time(),
            },
        )
        st.write_json(
            join(self.root, self.p.name, name, LATEST), {"fingerprint": fp, "output": uri}
        )
        tracker.end(run_id)
        print(f"[mmflow] {name}: committed in {duration:.1f}s", flush=True)
