"""The runner: executes a plan (mmflow.plan) on Ray: lease, attempt folders, tracking, commit.

Storage layout of a pipeline (see docs/architecture.md)::

    {storage}/{pipeline}/{stage}/{fingerprint}/
        {output}/...          one folder per declared output
        _work/                private scratch (checkpoints, markers); removed after the commit
        _attempts/{id}/       a forced re-execution builds here, beside the committed output
        _LEASE.json           the one writer of this output while it runs (mmflow.lease)
        _FAILED.json          the last attempt's error (removed when it is retried)
        _MANIFEST.json        written last: its presence *is* the commit
    {storage}/{pipeline}/{stage}/_LATEST.json   pointer to the newest committed fingerprint

An execution reads as its steps (``_execute``): take the lease, prepare the attempt's
folders, resolve the inputs, open the MLflow run, run the stage, commit, clean up.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from mmflow.config import PipelineConfig
from mmflow.lease import LEASE, Lease
from mmflow.plan import FAILED, LATEST, Plan, SelectionError, StageStatus  # noqa: F401
from mmflow.progress import brief_error, say, stage_begin, stage_end
from mmflow.ray_env import ensure_ray, gcs_actor_liveness  # noqa: F401
from mmflow.redact import redact_uri
from mmflow.stage import MANIFEST, Dataset, StageContext
from mmflow.storage import Storage, join, normalize

log = logging.getLogger(__name__)
# a failure's traceback goes to the console's log file; with none, nowhere (not to stderr)
log.addHandler(logging.NullHandler())


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException, resume: str):
        self.stage, self.cause, self.resume = stage, cause, resume
        super().__init__(f"stage {stage!r} failed: {cause}")


@dataclass
class RunReport:
    parent_run_id: str | None
    executed: list[str]
    cached: list[str]


@dataclass
class Attempt:
    """Where one execution of a stage writes: the committed folder itself, or, for a forced
    re-execution of a committed output, a folder aside that replaces it only at the commit."""

    folder: str  # the stage's fingerprint folder: manifest, lease, failure record
    base: str  # where outputs and _work go
    outputs: dict[str, str]
    work: str
    replaces: dict[str, Any] | None  # the manifest a forced run replaces


class Runner(Plan):
    """Executes a plan: what is missing or stale (or forced), in DAG order, on Ray."""

    def __init__(
        self, pipeline: PipelineConfig, storage: Storage | None = None, wait_for_lease: bool = True
    ):
        super().__init__(pipeline, storage)
        self.wait_for_lease = wait_for_lease

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
        tracker = Tracker(self.p.tracking_uri, self.p.name, self.p.path)
        params = {
            "pipeline_file": self.p.path,
            "storage": redact_uri(self.root),
            "overrides": self.p.overrides,
            "stages": {n: self.fingerprints[n] for n in chosen},
        }
        parent = tracker.start_parent(command or shlex.join(sys.argv), flatten("", params, {}))
        report = RunReport(parent, [], [])
        try:
            for name in chosen:
                if not force and self._cached(name, tracker):
                    report.cached.append(name)
                    continue
                ensure_ray()
                if self._execute(name, tracker, force):
                    report.executed.append(name)
                else:  # another run committed it while this one waited for the lease
                    report.cached.append(name)
        except StageFailed as e:
            tracker.end(parent, "FAILED")
            e.resume = self.resume_command(only, from_stage)
            raise
        except BaseException:
            tracker.end(parent, "KILLED")
            raise
        tracker.end(parent)
        return report

    def _cached(self, name: str, tracker) -> bool:
        man = self.manifest(name)
        if man is None:
            return False
        say(f"[mmflow] {name}: cached ({self.fingerprints[name]})")
        tracker.record_cache_hit(name, man.get("mlflow_run_id"))
        return True

    def _execute(self, name: str, tracker, force: bool) -> bool:
        """One stage, start to commit; False when another writer committed it meanwhile."""
        folder = self.uri(name)
        self.storage.makedirs(folder)
        with Lease(self.storage, join(folder, LEASE), f"stage {name!r}", wait=self.wait_for_lease):
            committed = self.manifest(name)
            if committed is not None and not force:
                return self._cached(name, tracker)
            attempt = self._prepare(name, committed)
            inputs = self._inputs(name)
            run_id = self._start_tracking(name, attempt, inputs, tracker)
            ctx = self._context(name, attempt, inputs, run_id)
            duration = self._run_stage(name, ctx, attempt, run_id, tracker)
            self._commit(name, ctx, attempt, inputs, run_id, duration)
            self._clean_after_commit(attempt)
            self._log_commit(ctx, run_id, duration, tracker)
        stage_end(name, f"[mmflow] {name}: committed in {duration:.1f}s{_figures(ctx.metrics)}")
        return True

    def _prepare(self, name: str, committed: dict[str, Any] | None) -> Attempt:
        """The attempt's folders, with the failure record gone and leftovers handled: a
        resumable stage keeps what an interrupted attempt finished; any other starts empty."""
        cfg, folder, st = self.p.stages[name], self.uri(name), self.storage
        st.delete(join(folder, FAILED))
        if committed is not None:  # forced: build aside, the committed output stays intact
            base = join(folder, "_attempts", uuid.uuid4().hex[:12])
            self._remove_attempts(folder, keep=_bases(committed))
        else:
            base = folder
            self._remove_attempts(folder, keep=set())
        attempt = Attempt(
            folder,
            base,
            {o: join(base, o) for o in cfg.stage_type.outputs},
            join(base, "_work"),
            committed,
        )
        removed = st.remove_temporaries(base)
        if not cfg.stage_type.resumable:
            for uri in [*attempt.outputs.values(), attempt.work]:
                removed += len([f for f in st.ls(uri, recursive=True) if not f.is_dir])
                st.delete(uri)
        stage_begin(
            name,
            f"[mmflow] {name}: running {cfg.type} -> {base}"
            + (f" (removed {removed} files of an earlier attempt)" if removed else ""),
        )
        return attempt

    def _remove_attempts(self, folder: str, keep: set[str]) -> None:
        for entry in self.storage.ls(join(folder, "_attempts")):
            if entry.is_dir and normalize(entry.uri) not in keep:
                self.storage.delete(entry.uri)

    def _inputs(self, name: str) -> dict[str, Dataset]:
        inputs = {}
        for iname, ref in self.p.stages[name].inputs.items():
            man = self.manifest(ref.stage)
            if man is None:
                cause = RuntimeError(f"input {iname!r}: {ref.stage!r} has no committed output")
                raise StageFailed(name, cause, "")
            out = man["outputs"][ref.output]
            inputs[iname] = Dataset(
                ref.stage, ref.output, out["kind"], out["uri"], man["fingerprint"], man
            )
        return inputs

    def _start_tracking(
        self, name: str, attempt: Attempt, inputs: dict[str, Dataset], tracker
    ) -> str | None:
        from mmflow.tracking import flatten

        cfg, fp = self.p.stages[name], self.fingerprints[name]
        trains = "model" in cfg.stage_type.outputs.values()  # its run logs system metrics
        run_id = tracker.start_stage(name, cfg.type, fp, attempt.base, system_metrics=trains)
        params = {
            "params": cfg.params.model_dump(mode="json"),
            "resources": cfg.resources.model_dump(),
            "fingerprint": fp,
            "code_version": cfg.stage_type.version,
            "output_uri": redact_uri(attempt.base),
            "inputs": {k: redact_uri(v.uri) for k, v in inputs.items()},
        }
        tracker.log_params(run_id, flatten("", params, {}))
        tracker.log_inputs(run_id, {k: (v.uri, v.fingerprint) for k, v in inputs.items()})
        return run_id

    def _context(
        self, name: str, attempt: Attempt, inputs: dict[str, Dataset], run_id: str | None
    ) -> StageContext:
        from mmflow import tracking

        cfg, turi = self.p.stages[name], self.p.tracking_uri
        return StageContext(
            pipeline=self.p.name,
            stage=name,
            params=cfg.params,
            resources=cfg.resources,
            inputs=inputs,
            outputs=dict(attempt.outputs),
            work_uri=attempt.work,
            storage=self.storage,
            tracking_uri=turi,
            run_id=run_id,
            _log_metrics=lambda m, step: tracking.log_metrics(turi, run_id, m, step),
            _log_image=lambda img, n: tracking.log_image(turi, run_id, img, n),
            _log_artifact=lambda path, ap: tracking.log_artifact(turi, run_id, path, ap),
        )

    def _run_stage(
        self, name: str, ctx: StageContext, attempt: Attempt, run_id: str | None, tracker
    ) -> float:
        """``Stage.run``; a failure leaves ``_FAILED.json`` (never beside a new manifest: the
        commit has not happened) and ends the MLflow run as FAILED or KILLED."""
        t0 = time.time()
        try:
            self.p.stages[name].stage_type().run(ctx)
            missing = [o for o, uri in ctx.outputs.items() if not self.storage.exists(uri)]
            if missing:
                raise RuntimeError(
                    f"stage wrote no output {', '.join(missing)} under {attempt.base}"
                )
        except BaseException as e:
            record = {
                "error": f"{type(e).__name__}: {e}",
                "mlflow_run_id": run_id,
                "traceback": traceback.format_exc(),
                "time": time.time(),
            }
            if attempt.replaces is None:  # a forced attempt's failure leaves the commit as it was
                self.storage.write_json(join(attempt.folder, FAILED), record)
            tracker.end(run_id, "FAILED" if isinstance(e, Exception) else "KILLED")
            log.error("stage %r failed", name, exc_info=True)  # the whole traceback, to the log
            why = f"failed after {time.time() - t0:.1f}s: {brief_error(e)}"
            stage_end(name, f"[mmflow] {name}: {why}", ok=False)
            if isinstance(e, Exception):
                raise StageFailed(name, e, "") from e
            raise
        return time.time() - t0

    def _commit(
        self,
        name: str,
        ctx: StageContext,
        attempt: Attempt,
        inputs: dict[str, Dataset],
        run_id: str | None,
        duration: float,
    ) -> None:
        """The manifest, written last and atomically: from here on the output is done."""
        cfg, fp, st = self.p.stages[name], self.fingerprints[name], self.storage
        st.remove_temporaries(attempt.base)
        kinds = cfg.stage_type.outputs
        outputs = {
            o: {"kind": kinds[o], "uri": uri, **ctx.output_info.get(o, {})}
            for o, uri in ctx.outputs.items()
        }
        ctx.metrics.update({"duration_s": duration, **_counts(ctx.output_info)})
        upstream = {
            k: {"stage": v.stage, "output": v.output, "uri": v.uri, "fingerprint": v.fingerprint}
            for k, v in inputs.items()
        }
        st.write_json(
            join(attempt.folder, MANIFEST),
            {
                "pipeline": self.p.name,
                "stage": name,
                "type": cfg.type,
                "fingerprint": fp,
                "code_version": cfg.stage_type.version,
                "params": cfg.params.model_dump(mode="json"),
                "inputs": upstream,
                "outputs": outputs,
                "metrics": ctx.metrics,
                "mlflow_run_id": run_id,
                "duration_s": duration,
                "committed_at": time.time(),
            },
        )
        latest = join(self.root, self.p.name, name, LATEST)
        st.write_json(latest, {"fingerprint": fp, "output": attempt.folder})

    def _clean_after_commit(self, attempt: Attempt) -> None:
        """Scratch, and the outputs a forced run replaced, go only after the commit: a kill
        before it loses nothing, a kill after it leaves only garbage the next attempt removes."""
        st = self.storage
        st.delete(attempt.work)
        if attempt.replaces is None:
            return
        for old in attempt.replaces["outputs"].values():
            if normalize(old["uri"]) not in {normalize(u) for u in attempt.outputs.values()}:
                st.delete(old["uri"])
        self._remove_attempts(attempt.folder, keep={normalize(attempt.base)})

    def _log_commit(self, ctx: StageContext, run_id: str | None, duration: float, tracker) -> None:
        """Duration and output counts to MLflow, after the commit: an MLflow outage here costs
        the metrics, never the output."""
        from mmflow import tracking

        try:
            counts = _counts(ctx.output_info)
            tracking.log_metrics(self.p.tracking_uri, run_id, {"duration_s": duration, **counts})
            tracker.end(run_id)
        except Exception as e:
            print(f"[mmflow] {ctx.stage}: warning: committed, but MLflow failed: {e}", flush=True)


def _figures(metrics: dict[str, Any], most: int = 8) -> str:
    """``: num_samples=4096, mismatch_rate=0.2``, the stage's first figures for its summary
    (an output's count the stage logged as a metric as well is shown once)."""
    shown = [
        f"{k}={_number(v)}"
        for k, v in metrics.items()
        if k != "duration_s" and not ("." in k and metrics.get(k.rsplit(".", 1)[1]) == v)
    ]
    if not shown:
        return ""
    more = f" (+{len(shown) - most} more in mmflow status)" if len(shown) > most else ""
    return ": " + ", ".join(shown[:most]) + more


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


def _bases(manifest: dict[str, Any]) -> set[str]:
    """The attempt folders a manifest's outputs live in (forced re-executions)."""
    out = set()
    for info in manifest.get("outputs", {}).values():
        uri = normalize(info["uri"])
        if "/_attempts/" in uri:
            out.add(uri.rsplit("/", 1)[0])
    return out


def _counts(output_info: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        f"{o}.{k}": v
        for o, info in output_info.items()
        for k, v in info.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
