"""Pipeline YAML -> typed, validated configs.

Everything is checked here, before Ray or MLflow start: stage types, params
(unknown or misspelt keys, wrong types), resources, inputs (unknown stage,
unknown output, wrong kind) and cycles. All problems are gathered and raised
as one ``ConfigError`` whose lines name the file, the stage and the field.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from mmflow.plugins import StageTypeError, get_stage_type, stage_type_names
from mmflow.stage import Params, Resources, Stage

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(explicit: str | None = None, from_yaml: str | None = None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > the YAML's ``tracking_uri`` > MLflow 3's
    default, ``sqlite:///mlflow.db``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or from_yaml or DEFAULT_TRACKING_URI


STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
TOP_LEVEL = ("name", "storage", "tracking_uri", "stages")
STAGE_FIELDS = ("type", "inputs", "params", "resources")


class ConfigError(Exception):
    """A pipeline that must not run. ``str()`` is the full, human-readable report."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class InputRef:
    stage: str
    output: str


@dataclass
class StageConfig:
    name: str
    stage_type: type[Stage]
    params: Params
    resources: Resources
    inputs: dict[str, InputRef]

    @property
    def type(self) -> str:
        return self.stage_type.type


@dataclass
class PipelineConfig:
    path: str
    name: str
    storage: str
    tracking_uri: str
    stages: dict[str, StageConfig]  # in topological (DAG) order
    overrides: list[str]


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(options) or 'none'})"


def parse_set(expr: str) -> tuple[list[str], Any]:
    """``stage.params.key=value`` -> (["stage", "params", "key"], parsed value)."""
    if "=" not in expr:
        raise ConfigError([f"--set {expr!r}: expected STAGE.params.KEY=VALUE"])
    key, _, raw = expr.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 3 or parts[1] not in ("params", "resources"):
        raise ConfigError(
            [f"--set {expr!r}: expected STAGE.params.KEY=VALUE or STAGE.resources.KEY=VALUE"]
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def load_pipeline(
    path: str,
    overrides: list[str] | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> PipelineConfig:
    """Read, override, validate and order a pipeline; every problem is gathered into one
    :class:`ConfigError` naming the file, the stage and the field."""
    overrides = list(overrides or [])
    raw = _read_yaml(path)
    problems: list[str] = []
    name, stages_raw = _top_level(raw, path, problems)
    _apply_overrides(stages_raw, overrides, problems)
    configs, inputs_raw = _stage_configs(stages_raw, path, problems)
    _wire_inputs(configs, inputs_raw, stages_raw, path, problems)
    order = _topological_order(configs, problems, path)
    if problems:
        raise ConfigError(problems)
    return PipelineConfig(
        path=path,
        name=name,
        storage=str(storage or raw.get("storage") or "./mmflow-data"),
        tracking_uri=str(resolve_tracking_uri(tracking_uri, raw.get("tracking_uri"))),
        stages={n: configs[n] for n in order},
        overrides=overrides,
    )


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such pipeline file"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping with {', '.join(TOP_LEVEL)}"])
    return raw


def _top_level(raw: dict[str, Any], where: str, problems: list[str]) -> tuple[str, dict]:
    """The pipeline's name and its raw ``stages`` mapping; unknown fields are problems."""
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(
                f"{where}: field {key!r}: unknown top-level field{_suggest(key, list(TOP_LEVEL))}"
            )
    name = raw.get("name")
    if not isinstance(name, str) or not STAGE_NAME.match(name):
        problems.append(f"{where}: field 'name': required, letters/digits/_/- (got {name!r})")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        problems.append(f"{where}: field 'stages': required, a mapping of stage name -> stage")
        raise ConfigError(problems)
    return name, stages_raw


def _apply_overrides(stages_raw: dict[str, Any], overrides: list[str], problems: list[str]) -> None:
    """``--set`` values go into the raw mapping, so they are validated like YAML values."""
    for expr in overrides:
        parts, value = parse_set(expr)
        stage_name = parts[0]
        if stage_name not in stages_raw:
            problems.append(
                f"--set {expr!r}: no stage {stage_name!r}{_suggest(stage_name, list(stages_raw))}"
            )
            continue
        stage = stages_raw[stage_name]
        node = stage.setdefault(parts[1], {}) if isinstance(stage, dict) else {}
        for key in parts[2:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = value


def _stage_type(tname: Any, at: str, problems: list[str]) -> type[Stage] | None:
    try:
        stype = get_stage_type(tname) if isinstance(tname, str) else None
    except StageTypeError as e:
        problems.append(f"{at}, field 'type': {e}")
        return None
    if stype is None:
        problems.append(
            f"{at}, field 'type': unknown stage type {tname!r}"
            f"{_suggest(str(tname), stage_type_names())}"
        )
    return stype


def _stage_configs(
    stages_raw: dict[str, Any], where: str, problems: list[str]
) -> tuple[dict[str, StageConfig], dict[str, dict[str, Any]]]:
    """Each stage's type, params and resources, validated; its raw inputs kept for wiring."""
    configs: dict[str, StageConfig] = {}
    inputs: dict[str, dict[str, Any]] = {}
    for sname, sraw in stages_raw.items():
        at = f"{where}: stage {sname!r}"
        if not isinstance(sname, str) or not STAGE_NAME.match(sname):
            problems.append(f"{at}: stage names use letters, digits, _ and -")
            continue
        if not isinstance(sraw, dict):
            problems.append(f"{at}: expected a mapping with {', '.join(STAGE_FIELDS)}")
            continue
        for key in sraw:
            if key not in STAGE_FIELDS:
                problems.append(
                    f"{at}, field {key!r}: unknown field{_suggest(key, list(STAGE_FIELDS))}"
                )
        stype = _stage_type(sraw.get("type"), at, problems)
        if stype is None:
            continue
        params = _validate(stype.Params, sraw.get("params") or {}, f"{at}, field 'params", problems)
        res_raw = sraw.get("resources") or {}
        if isinstance(res_raw, dict):
            res_raw = {**stype.resources.model_dump(), **res_raw}
        res = _validate(Resources, res_raw, f"{at}, field 'resources", problems)
        inputs_raw = sraw.get("inputs") or {}
        if not isinstance(inputs_raw, dict):
            problems.append(
                f"{at}, field 'inputs': expected a mapping of input name -> stage[.output]"
            )
            inputs_raw = {}
        inputs[sname] = inputs_raw
        if params is not None and res is not None:
            configs[sname] = StageConfig(sname, stype, params, res, {})
    return configs, inputs


def _wire_inputs(
    configs: dict[str, StageConfig],
    inputs: dict[str, dict[str, Any]],
    stages_raw: dict[str, Any],
    where: str,
    problems: list[str],
) -> None:
    """Resolve each ``input: stage[.output]`` to an upstream output of the right kind."""
    for sname, cfg in configs.items():
        stype, inputs_raw = cfg.stage_type, inputs[sname]
        at = f"{where}: stage {sname!r}"
        for iname in inputs_raw:
            if iname not in stype.inputs:
                problems.append(
                    f"{at}, field 'inputs.{iname}': {stype.type} has no input {iname!r}"
                    f"{_suggest(iname, list(stype.inputs))}"
                )
        for iname, kind in stype.inputs.items():
            ref = inputs_raw.get(iname)
            if ref is None:
                if iname not in stype.optional_inputs:
                    problems.append(
                        f"{at}, field 'inputs.{iname}': missing input ({kind}) for {stype.type}"
                    )
                continue
            resolved = _resolve_input(str(ref), kind, configs, stages_raw)
            if isinstance(resolved, str):
                problems.append(f"{at}, field 'inputs.{iname}': {resolved}")
            elif resolved is not None:
                cfg.inputs[iname] = resolved
        for field, message in stype.check_wiring(cfg.params, set(inputs_raw)):
            problems.append(f"{at}, field '{field}': {message}")


def _resolve_input(
    ref: str, kind: str, configs: dict[str, StageConfig], stages_raw: dict[str, Any]
) -> InputRef | str | None:
    """The upstream output ``ref`` names, or a problem; None when the upstream stage has
    problems of its own (already reported)."""
    up, _, out = ref.partition(".")
    if up not in stages_raw:
        return f"no stage {up!r}{_suggest(up, list(stages_raw))}"
    if up not in configs:
        return None
    up_outputs = configs[up].stage_type.outputs
    if not out:
        if len(up_outputs) != 1:
            return f"stage {up!r} has outputs {', '.join(up_outputs)}; name one as {up}.OUTPUT"
        out = next(iter(up_outputs))
    if out not in up_outputs:
        return f"stage {up!r} has no output {out!r}{_suggest(out, list(up_outputs))}"
    if up_outputs[out] != kind:
        return f"needs {kind}, but {up}.{out} is {up_outputs[out]}"
    return InputRef(up, out)


def _validate(model: type, data: Any, at: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{at}': expected a mapping, got {type(data).__name__}")
        return None
    try:
        return model(**data)
    except ValidationError as e:
        fields = list(model.model_fields)
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msg = f"unknown param{_suggest(str(err['loc'][0]), fields)}"
            else:
                msg = f"{err['msg']} (got {err.get('input')!r})"
            problems.append(f"{at}.{loc}': {msg}")
        return None


def _topological_order(
    configs: dict[str, StageConfig], problems: list[str], where: str
) -> list[str]:
    """Kahn's algorithm, keeping YAML order among ready stages; reports a cycle by name."""
    deps = {n: {r.stage for r in c.inputs.values()} for n, c in configs.items()}
    order: list[str] = []
    ready = [n for n in configs if not deps[n]]
    remaining = {n: set(d) for n, d in deps.items() if d}
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in list(remaining):
            remaining[m].discard(n)
            if not remaining[m]:
                del remaining[m]
                ready.append(m)
    if remaining:
        problems.append(
            f"{where}: field 'stages': inputs form a cycle among {', '.join(sorted(remaining))}"
        )
    return order
