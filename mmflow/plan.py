"""Planning without running: fingerprints, where outputs are, each stage's state, why a stage
is not done (what changed since its committed output), what ``--only`` / ``--from`` select,
and the command that resumes a run. Pure reads of storage: no Ray, no torch, no MLflow."""

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


@dataclass
class Change:
    """One ingredient of a stage's fingerprint that differs from a committed output's.

    ``what`` is ``type``, ``code_version``, ``param`` (``name`` its dotted key) or ``input``
    (``name`` the input's name, values ``stage.output@fingerprint``); ``old`` / ``new`` is
    ``ABSENT`` where one side has no such ingredient. ``because`` says, for an input, what
    changed in its upstream stage since the output this one was made from."""

    what: str
    name: str
    old: Any
    new: Any
    upstream: str | None = None
    because: Why | None = None

    def describe(self) -> str:
        label = f"{self.what} {self.name}" if self.name else self.what.replace("_", " ")
        if self.old is ABSENT:
            gone = "newly wired" if self.what == "input" else "not recorded in the committed output"
            return f"{label}: {self._show(self.new)} ({gone})"
        if self.new is ABSENT:
            gone = "no longer wired" if self.what == "input" else "no longer a param"
            return f"{label}: {gone} (was {self._show(self.old)})"
        if self.what == "input":
            (was, old_fp), (now, new_fp) = (v.rsplit("@", 1) for v in (self.old, self.new))
            if was == now:
                return f"{label}: {now} {old_fp} -> {new_fp}"
        return f"{label}: {self._show(self.old)} -> {self._show(self.new)}"

    def _show(self, value: Any) -> str:
        return value if self.what == "input" else json.dumps(value)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"what": self.what, "name": self.name}
        d.update({k: v for k, v in (("old", self.old), ("new", self.new)) if v is not ABSENT})
        if self.upstream:
            d["upstream"] = self.upstream
        if self.because:
            d["because"] = self.because.to_json()
        return d


@dataclass
class Why:
    """What makes ``stage`` not done: its ingredients against those of ``committed`` (the
    fingerprint of the output compared with), or a ``note`` where nothing can be compared."""

    stage: str
    state: str
    fingerprint: str
    committed: str | None
    changes: list[Change]
    note: str = ""

    def lines(self, shown: set[tuple[str, str | None]]) -> list[str]:
        """``STAGE is stale: ...`` and what changed, each input change followed by what changed
        in its upstream stage, indented; an upstream in ``shown`` (explained above: a diamond
        in the DAG reaches it twice) is not explained again."""
        verb = "failed" if self.state == "failed" else f"is {self.state}"
        if not self.changes or self.state == "done":
            return [f"{self.stage} {verb}: {self.note}"]
        out = [f"{self.stage} {verb}: fingerprint {self.fingerprint}, its committed output "
               f"{self.committed}; changed since:"]  # fmt: skip
        out += self._change_lines("  ", shown)
        return out + ([f"  ({self.note})"] if self.note else [])

    def _change_lines(self, indent: str, shown: set[tuple[str, str | None]]) -> list[str]:
        out = []
        for c in self.changes:
            b = c.because
            if b is None:
                out.append(f"{indent}{c.describe()}")
            elif (b.stage, b.committed) in shown:
                out.append(f"{indent}{c.describe()} ({b.stage}: as above)")
            elif not b.changes:
                out.append(f"{indent}{c.describe()}, because in {b.stage}: {b.note}")
            else:
                shown.add((b.stage, b.committed))
                out.append(f"{indent}{c.describe()}, because in {b.stage}:")
                out += b._change_lines(indent + "  ", shown)
        return out

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("stage", "state", "fingerprint", "committed")}
        d["changes"] = [c.to_json() for c in self.changes]
        if self.note:
            d["note"] = self.note
        return d


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT: Any = _Absent()


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

    # ---- why a stage is not done ------------------------------------------------
    def why(self, stage: str) -> Why:
        """What changed since ``stage``'s newest committed output (its ``_LATEST.json``):
        stage type, code version, params, input fingerprints; each input change explained in
        turn by its upstream stage against the manifest of the output it was made from."""
        row = self._status(stage, self.p.stages[stage])
        fp = self.fingerprints[stage]
        if row.state == "done":
            return Why(stage, "done", fp, fp, [], "its committed output has this fingerprint")
        latest = self.storage.read_json_if_exists(join(self.root, self.p.name, stage, LATEST))
        man = latest and self.storage.read_json_if_exists(join(latest["output"], MANIFEST))
        failed = f"the last attempt failed: {row.error}; " if row.state == "failed" else ""
        if not man:
            return Why(stage, row.state, fp, None, [], failed + "no output was ever committed")
        return self._against(stage, row.state, man, failed)

    def _against(self, stage: str, state: str, man: dict[str, Any], note: str = "") -> Why:
        cfg, fp = self.p.stages[stage], self.fingerprints[stage]
        changes = [
            Change(what, "", man.get(key, ABSENT), new)
            for what, key, new in (
                ("type", "type", cfg.type),
                ("code_version", "code_version", cfg.stage_type.version),
            )
            if man.get(key, ABSENT) != new
        ]
        new_params = cfg.params.model_dump(mode="json")
        for key, old, new in _diff(man.get("params", {}), new_params):
            changes.append(Change("param", key, old, new))
        changes += self._input_changes(stage, man.get("inputs", {}))
        missing = [k for k in ("type", "code_version", "params", "inputs") if k not in man]
        if missing:
            note += f"the committed output's manifest does not record {', '.join(missing)}; "
        elif not changes:  # same ingredients, other fingerprint: the recipe itself changed
            note += "no ingredient differs: the committed fingerprint was computed another way "
            note += "(an older mmflow); "
        return Why(stage, state, fp, man.get("fingerprint"), changes, note.rstrip("; "))

    def _input_changes(self, stage: str, old_inputs: dict[str, Any]) -> list[Change]:
        out = []
        new_inputs = self.p.stages[stage].inputs
        for name in sorted(set(old_inputs) | set(new_inputs)):
            old, ref = old_inputs.get(name), new_inputs.get(name)
            now_fp = self.fingerprints[ref.stage] if ref else None
            if ref and old and (old["output"], old["fingerprint"]) == (ref.output, now_fp):
                continue
            was = f"{old['stage']}.{old['output']}@{old['fingerprint']}" if old else ABSENT
            now = f"{ref.stage}.{ref.output}@{now_fp}" if ref else ABSENT
            change = Change("input", name, was, now, ref.stage if ref else None)
            if ref and old and old["fingerprint"] != now_fp:
                change.because = self._upstream(ref.stage, old["fingerprint"])
            out.append(change)
        return out

    def _upstream(self, stage: str, old_fp: str) -> Why:
        """Why ``stage`` now has another fingerprint than ``old_fp``, an output of it that a
        downstream stage was made from."""
        state = self._status(stage, self.p.stages[stage]).state
        uri = output_uri(self.root, self.p.name, stage, old_fp)
        man = self.storage.read_json_if_exists(join(uri, MANIFEST))
        if man is None:
            fp = self.fingerprints[stage]
            return Why(stage, state, fp, old_fp, [], f"no manifest at {uri} any more")
        return self._against(stage, state, man)

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


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) where two params trees differ, into the mappings both have."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [(prefix, old, new)]
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _diff(old.get(k, ABSENT), new.get(k, ABSENT), key)
    return out


def _row(name: str, type_: str, state: str, fp: str, uri: str, man: dict) -> StageStatus:
    outputs = {o: info["uri"] for o, info in man.get("outputs", {}).items()}
    run = man.get("mlflow_run_id")
    return StageStatus(name, type_, state, fp, uri, run, man.get("metrics", {}), None, outputs)
