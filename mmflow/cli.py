"""``mmflow`` command line: run, status, stages, ui, decode, generate, chat.

Exit codes: 0 success; 1 a stage failed (the resume command is printed);
2 the pipeline or the command line is wrong (nothing was started).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from mmflow.config import ConfigError, load_pipeline, resolve_tracking_uri
from mmflow.redact import redact_uri

EXIT_FAILED, EXIT_USAGE = 1, 2


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.params.KEY=VALUE",
        help="override a param (or STAGE.resources.KEY); repeatable",
    )
    p.add_argument("--storage", help="storage root URI (overrides the YAML)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (overrides MLFLOW_TRACKING_URI and the YAML)"
    )


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stages whose outputs are missing or stale")
    _pipeline_args(run)
    sel = run.add_mutually_exclusive_group()
    sel.add_argument(
        "--only", type=_names, metavar="STAGE[,STAGE]", help="run just these, on committed inputs"
    )
    sel.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="run this stage and all downstream"
    )
    run.add_argument(
        "--force", action="store_true", help="re-execute selected stages even on a cache hit"
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="if another run is writing a stage's output, stop instead of waiting for it",
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output (worker logs, warnings) besides mmflow's progress",
    )

    status = sub.add_parser("status", help="state of every stage: done, stale, missing or failed")
    _pipeline_args(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--why",
        nargs="?",
        const="",
        metavar="STAGE",
        help="what changed (param, input fingerprint, code version) since the committed output "
        "of STAGE, or of every stage that is not done",
    )

    stages = sub.add_parser("stages", help="list stage types with their params and defaults")
    stages.add_argument("--json", action="store_true")

    ui = sub.add_parser("ui", help="start the MLflow UI on a pipeline's tracking store")
    ui.add_argument("pipeline", nargs="?", help="pipeline YAML (for its tracking_uri)")
    ui.add_argument("--tracking-uri")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--workers", type=int, help="server processes (default: MLflow's, 4)")

    decode = sub.add_parser("decode", help="decode rows of a token table back to PNGs")
    decode.add_argument(
        "tokens",
        help="a pretokenize `tokens` output folder (local or s3://), or a pipeline YAML: its "
        "pretokenize stage's committed output",
    )
    decode.add_argument(
        "--stage", help="with a pipeline YAML: the stage (default: its pretokenize)"
    )
    decode.add_argument("--rows", default="0-15", help="row numbers and ranges, e.g. 0-15,20")
    decode.add_argument(
        "--keys", type=_names, help="sample keys instead of --rows, comma-separated"
    )
    decode.add_argument("--out", required=True, help="folder for the PNGs and contact_sheet.png")
    decode.add_argument(
        "--tracking-uri", help="MLflow registry to find the VQ-GAN in, if its folder is gone"
    )
    gen = sub.add_parser("generate", help="draw pictures from a prompt, or caption pictures")
    gen.add_argument(
        "model", help="a pipeline YAML (its committed joint_train model) or a model folder"
    )
    gen.add_argument("--stage", help="with a pipeline YAML: the stage (default: its joint_train)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="draw pictures of this caption")
    what.add_argument("--caption", nargs="+", metavar="IMAGE", help="caption these pictures")
    gen.add_argument("--n", type=int, default=8, help="pictures to draw")
    gen.add_argument("--out", help="folder for the PNGs and contact_sheet.png")
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the stage's)")
    gen.add_argument(
        "--temperature", type=float, help="0 = greedy (default: the stage's; 0 for captions)"
    )
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    chat = sub.add_parser(
        "chat", help="ask a LLaVA model about a picture (interactive without a question)"
    )
    chat.add_argument(
        "model", help="a pipeline YAML (its committed llava_instruct model) or a model folder"
    )
    chat.add_argument(
        "question", nargs="?", help="one question; without it, an interactive session"
    )
    chat.add_argument("--image", required=True, help="the picture (any format PIL reads)")
    chat.add_argument(
        "--stage", help="with a pipeline YAML: the stage (default: its llava_instruct)"
    )
    chat.add_argument("--max-new-tokens", type=int, default=32)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--seed", type=int, default=0)
    return parser


def cmd_run(args) -> int:
    from mmflow.console import Console
    from mmflow.lease import LeaseHeld
    from mmflow.progress import brief_error
    from mmflow.runner import Runner, SelectionError, StageFailed

    pipeline = load_pipeline(args.pipeline, args.overrides, args.storage, args.tracking_uri)
    runner = Runner(pipeline, wait_for_lease=not args.no_wait)
    console = Console(verbose=args.verbose)
    try:
        with console:
            report = runner.run(
                only=args.only,
                from_stage=args.from_stage,
                force=args.force,
                command=shlex.join(["mmflow", *sys.argv[1:]]),
            )
    except (SelectionError, LeaseHeld) as e:
        print(f"mmflow: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailed as e:
        print(f"\nmmflow: stage {e.stage!r} failed: {brief_error(e.cause)}", file=sys.stderr)
        if console.log_file:
            print(f"mmflow: the whole traceback is in {console.log_file}", file=sys.stderr)
        if console.native_log and os.path.exists(console.native_log):
            print(f"mmflow: native code's own output is in {console.native_log}", file=sys.stderr)
        print(f"mmflow: finished stages are kept; to resume run:\n  {e.resume}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; `ray job stop` (Ray's SIGTERM handler)
        resume = runner.resume_command(args.only, args.from_stage)
        print(f"\nmmflow: stopped; finished stages and shards are kept; to resume run:\n  {resume}",
              file=sys.stderr, flush=True)  # fmt: skip
        raise
    print(
        f"[mmflow] {pipeline.name}: {len(report.executed)} executed, {len(report.cached)} cached; "
        f"MLflow run {report.parent_run_id} at {redact_uri(pipeline.tracking_uri)}",
        flush=True,
    )
    return 0


def cmd_status(args) -> int:
    from mmflow.plan import Plan

    pipeline = load_pipeline(args.pipeline, args.overrides, args.storage, args.tracking_uri)
    plan = Plan(pipeline)
    rows = plan.status()
    if args.why and args.why not in pipeline.stages:
        print(
            f"mmflow: {args.pipeline}: no stage {args.why!r} "
            f"(stages: {', '.join(pipeline.stages)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    why = {}
    if args.why is not None:
        names = [args.why] if args.why else [r.name for r in rows if r.state != "done"]
        why = {n: plan.why(n) for n in names}
    if args.json:
        stages = [{**r.to_json(), **({"why": why[r.name].to_json()} if r.name in why else {})}
                  for r in rows]  # fmt: skip
        print(json.dumps({"pipeline": pipeline.name, "stages": stages}, indent=2))
        return 0
    print(
        f"pipeline {pipeline.name}  storage {redact_uri(pipeline.storage)}  "
        f"tracking {redact_uri(pipeline.tracking_uri)}"
    )
    for r in rows:
        metrics = ", ".join(
            f"{k}={v:.4g}" for k, v in sorted(r.metrics.items()) if k != "duration_s"
        )
        print(f"  {r.name:<16} {r.type:<14} {r.state:<8} {r.fingerprint}  {metrics}")
        if r.output:
            print(f"  {'':<16} output {r.output}")
        if r.error:
            print(f"  {'':<16} error  {r.error}")
    if args.why is not None and not why:
        print("every stage is done: nothing to explain")
    shown: set[tuple[str, str | None]] = set()
    for w in why.values():
        print("\n" + "\n".join(w.lines(shown)))
    return 0


def cmd_stages(args) -> int:
    from mmflow.plugins import stage_types

    out = {}
    for name, cls in stage_types().items():
        params = {}
        for fname, f in cls.Params.model_fields.items():
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            if hasattr(default, "model_dump"):
                default = default.model_dump(mode="json")
            params[fname] = {
                "type": getattr(f.annotation, "__name__", str(f.annotation)),
                "default": default,
                "description": f.description or "",
            }
        out[name] = {
            "description": cls.description,
            "version": cls.version,
            "inputs": {
                k: f"{v} (optional)" if k in cls.optional_inputs else v
                for k, v in cls.inputs.items()
            },
            "outputs": cls.outputs,
            "resources": cls.resources.model_dump(),
            "params": params,
        }
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    for name, info in out.items():
        print(f"{name}  (v{info['version']}) {info['description']}")
        print(
            f"  inputs: {info['inputs'] or '-'}  outputs: {info['outputs']}  resources: {info['resources']}"
        )
        for pname, p in info["params"].items():
            desc = f"  # {p['description']}" if p["description"] else ""
            print(f"    {pname}: {p['type']} = {p['default']!r}{desc}")
    return 0


def cmd_ui(args) -> int:
    """``mlflow ui`` on the pipeline's store, after printing where its runs are."""
    from mmflow.tracking import ui_url

    pipeline = load_pipeline(args.pipeline) if args.pipeline else None
    uri = resolve_tracking_uri(args.tracking_uri or (pipeline.tracking_uri if pipeline else None))
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host  # where a browser goes
    url = ui_url(uri, f"http://{host}:{args.port}", pipeline.name if pipeline else None)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--app-name", "mmflow"]
    cmd += ["--host", args.host, "--port", str(args.port)]
    cmd += ["--workers", str(args.workers)] if args.workers else []
    print(f"[mmflow] MLflow UI for {redact_uri(uri)}: {url}", flush=True)
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover


def _committed(path: str, stage: str | None, stage_type: str, output: str) -> tuple[str, str]:
    """(output URI, tracking URI) of a pipeline's committed stage of ``stage_type``."""
    from mmflow.plan import Plan

    pipeline = load_pipeline(path)
    names = [n for n, c in pipeline.stages.items() if c.type == stage_type]
    if stage is None and len(names) != 1:
        raise ValueError(f"{path}: {stage_type} stages {names}; name one with --stage")
    stage = stage or names[0]
    if stage not in pipeline.stages:
        raise ValueError(f"{path}: no stage {stage!r} (stages: {', '.join(pipeline.stages)})")
    [row] = [r for r in Plan(pipeline).status() if r.name == stage]
    if row.state != "done":
        raise FileNotFoundError(
            f"{path}: stage {stage!r} is {row.state}; run it first: mmflow run {path}"
        )
    if output not in row.outputs:
        raise ValueError(f"{path}: stage {stage!r} has no `{output}` output (a {stage_type}?)")
    return row.outputs[output], pipeline.tracking_uri


def cmd_decode(args) -> int:
    from mmflow.decode import decode

    try:
        tokens, tracking_uri = args.tokens, args.tracking_uri
        if tokens.endswith((".yaml", ".yml")):
            tokens, own_uri = _committed(tokens, args.stage, "pretokenize", "tokens")
            tracking_uri = tracking_uri or own_uri
        out = decode(tokens, args.out, args.rows, args.keys, tracking_uri)
    except (FileNotFoundError, ValueError, KeyError, IndexError) as e:
        print(f"mmflow decode: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"[mmflow] decoded {len(out['files'])} rows into {args.out} (contact sheet {out['contact_sheet']})"
    )
    return 0


def cmd_generate(args) -> int:
    from mmflow.generate.joint import PromptError, caption_files, draw_to_folder, load_painter
    from mmflow.io.cache import materialize

    try:
        folder = args.model
        if folder.endswith((".yaml", ".yml")):
            folder, _ = _committed(folder, args.stage, "joint_train", "model")
        painter = load_painter(materialize(folder))
        sampling = painter.sampling_for(
            drawing=args.prompt is not None, temperature=args.temperature,
            guidance_scale=args.guidance, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        )  # fmt: skip
        if args.prompt is not None:
            if not args.out:
                raise ValueError("--prompt needs --out DIR for the pictures")
            out = draw_to_folder(painter, args.prompt, args.n, sampling, args.out)
            print(f"[mmflow] {len(out['files'])} pictures of {args.prompt!r} in {args.out} "
                  f"(contact sheet {out['contact_sheet']})")  # fmt: skip
        else:
            for path, text in caption_files(painter, args.caption, sampling):
                print(f"{path}\t{text}")
    except (FileNotFoundError, ValueError, PromptError, OSError) as e:
        print(f"mmflow generate: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_chat(args) -> int:
    from mmflow.generate.llava import chat_session, load_chat, read_image
    from mmflow.generate.sampling import SamplingConfig

    try:
        folder = args.model
        if folder.endswith((".yaml", ".yml")):
            folder, _ = _committed(folder, args.stage, "llava_instruct", "model")
        image = read_image(args.image)
        chat = load_chat(folder)
        cfg = SamplingConfig(temperature=args.temperature, seed=args.seed)
        if args.question is not None:
            print(chat.ask(image, args.question, cfg=cfg, max_new_tokens=args.max_new_tokens))
        else:
            chat_session(chat, image, cfg, args.max_new_tokens)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"mmflow chat: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `chat MODEL --image PIC QUESTION`: argparse gives the optional positional up before --image
    chat_question = getattr(args, "command", None) == "chat" and args.question is None
    if chat_question and len(extra) == 1 and not extra[0].startswith("-"):
        args.question = extra.pop()
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return {
            "run": cmd_run,
            "status": cmd_status,
            "stages": cmd_stages,
            "ui": cmd_ui,
            "decode": cmd_decode,
            "generate": cmd_generate,
            "chat": cmd_chat,
        }[args.command](args)
    except ConfigError as e:
        print(
            "mmflow: the pipeline is not valid; nothing was run:\n"
            + "\n".join(f"  {p}" for p in e.problems),
            file=sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
