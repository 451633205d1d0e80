"""The shared training harness: one loop for every training stage.

A stage supplies a :class:`TrainTask` (model, data, loss, eval, save) and a
:class:`TrainConfig`; :func:`fit` runs it on ``ctx.resources.workers`` Ray Train
workers with DDP or DeepSpeed (ZeRO 0-3) and takes care of the rest. One worker runs
in one Ray task instead, the same loop in Ray Train's local mode (``_fit_alone``: Ray
Train's start-up is a fixed ~20 s a stage that a single worker does not need).

- checkpoints every ``checkpoint_every`` optimizer steps and at the end, under
  ``ctx.work("checkpoints", "step_XXXXXXXX")``. Every rank uploads its part,
  then (after a barrier) rank 0 writes ``_COMPLETE`` last; a folder without it
  is never used. The newest two complete checkpoints are kept.
- resume: every attempt starts from the newest complete checkpoint, so a Ray
  Train restart after a worker failure (a lost node included) and a new ``fit``
  over the same ``work_uri`` both continue where the last checkpoint left off.
  Rank 0 records each such restart in the stage's MLflow run: the metric
  ``train/restarted_at_step`` (the step it continued from) and the tag
  ``mmflow.train_restarts`` (how many times this run started again).
- placement: ``ctx.resources.placement`` is Ray Train's placement strategy for the
  workers (PACK by default; SPREAD puts them on different nodes when it can).
- metrics: rank 0 logs ``train/*`` every ``log_every`` steps and ``eval/*`` to the
  stage's MLflow run (when ``ctx.run_id`` is set); Ray Train gets them at eval and
  checkpoint steps and at the end (each ``ray.train.report`` is a barrier that may wait
  ~2 s for the controller, too slow for every log step).
- progress: rank 0 reports steps, rate, ETA and loss (``mmflow.progress``: the driver's
  console draws it; its plain lines come at most every 5 s and at the end).
- data counts: each rank's ``task.data_counters()`` (samples read, skipped by reason) are
  summed over ranks at the end and returned as ``data/<name>``.

``ray.init`` is the caller's business; ``fit`` uses whatever cluster is there.
"""

from __future__ import annotations

import os
import random
import tempfile
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mmflow.progress import say, send_sync, wait_for_sync
from mmflow.stage import StageContext
from mmflow.storage import Storage, filesystem, join, normalize
from mmflow.train.checkpoints import Checkpoints
from mmflow.train.config import TrainConfig, TrainTask
from mmflow.train.reporting import StepProgress, Tracker, Window, note_start

SYNC_KEY = "_sync"  # rank 0's sync token in the loop's return value, taken out by fit

if TYPE_CHECKING:
    import torch
    from torch import nn

_END = object()


def fit(
    task: TrainTask,
    cfg: TrainConfig,
    ctx: StageContext,
    model_output: str | None = "model",
    datasets: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train ``task`` on Ray Train workers, resuming from ``ctx.work("checkpoints")`` if a
    checkpoint is there, and upload ``task.save``'s files to ``ctx.outputs[model_output]``.
    ``datasets`` (Ray Data) stream to the workers, each reading its own shard with
    ``ray.train.get_dataset_shard(name)`` in ``task.train_batches``: no worker holds a copy.

    Returns the final metrics: ``step``, ``train/loss``, the ``eval/*`` of the final model and
    ``data/<name>``, each of ``task.data_counters()`` summed over ranks (the MLflow history is
    already logged; ``ctx.metrics`` is left to the stage). Raises
    ``ray.train.TrainingFailedError`` once workers failed more than ``cfg.max_failures`` times
    (one worker: the loop's own error through Ray's task error, or Ray's error for a lost
    process or node).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = ctx.resources
    if cfg.precision == "fp16" and res.gpus <= 0:
        raise ValueError(
            "TrainConfig.precision='fp16' needs GPUs (resources.gpus > 0); on CPU use 'bf16' or 'fp32'"
        )
    if model_output is not None and model_output not in ctx.outputs:
        raise KeyError(f"stage {ctx.stage!r} has no output {model_output!r} for the trained model")
    config = {
        "task": task,
        "cfg": cfg.model_dump(),
        "stage": ctx.stage,
        # absolute: Ray Train runs the workers in a directory of its own
        "work_uri": normalize(ctx.work_uri),
        "tracking_uri": absolute_tracking_uri(ctx.tracking_uri),
        "run_id": ctx.run_id,
        "model_uri": normalize(ctx.outputs[model_output]) if model_output is not None else None,
        # a worker group that finds this fit's marker is a restart of it (see _worker_loop)
        "fit_id": uuid.uuid4().hex,
    }
    if res.workers == 1:
        return _fit_alone(config, datasets, ctx, cfg)
    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus > 0 else {})}
    fs, ray_path = filesystem(ctx.work("ray_train"))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.gpus > 0,
            resources_per_worker=per_worker,
            placement_strategy=res.placement,
        ),
        run_config=RunConfig(
            name=f"train-{uuid.uuid4().hex[:8]}",
            storage_path=ray_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
    )
    return _after_sync(dict(trainer.fit().return_value or {}))


def _fit_alone(
    config: dict[str, Any], datasets: dict[str, Any] | None, ctx: StageContext, cfg: TrainConfig
) -> dict[str, float]:
    """One worker: the worker loop in one Ray task that holds the worker's resources.

    Ray Train's controller starts seven actors one after another before its one worker
    trains (the controller, Ray Data's coordinator, a synchronization actor, a placement-group
    cleaner, a dataset manager, a preemption watcher, the worker): about 20 s of a 2-core
    machine at every training stage, more than some of the quickstart's stages train. One task
    starts one process and runs the loop in Ray Train's local mode, so the loop is the same
    code with the same ``ray.train`` calls (a dataset's shard is the whole dataset). The
    task's retries stand in for ``FailureConfig``: ``cfg.max_failures`` of them, a lost
    process or node and an error alike, each resuming from the newest complete checkpoint
    as a restarted worker group does.
    """
    import ray

    res = ctx.resources
    # max_calls=1: a process of its own; the process group and its environment end with it
    run = ray.remote(max_calls=1)(_alone).options(
        name=f"{ctx.stage}.train",
        num_cpus=res.cpus,
        num_gpus=res.gpus if res.gpus > 0 else 0,
        max_retries=cfg.max_failures,
        retry_exceptions=True,
    )
    return _after_sync(ray.get(run.remote(config, datasets, res.gpus > 0)))


def _after_sync(final: dict[str, Any]) -> dict[str, float]:
    """The final metrics, once rank 0's last progress has been shown (its attempt's sync line,
    see ``_worker_loop``)."""
    token = final.pop(SYNC_KEY, None)
    if token:
        wait_for_sync(token)
    return final


def _alone(config: dict[str, Any], datasets: dict[str, Any] | None, gpus: bool) -> dict[str, Any]:
    """In the task: a one-process torch.distributed group (gloo, or nccl on a GPU, set up by
    Ray Train's local mode from this environment), then the worker loop."""
    import socket

    if not gpus:  # Ray leaves a GPU node's devices visible to a task that asked for none
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    # A free port, probed: MASTER_PORT=0 would let the store pick one, but DeepSpeed's CPU
    # communication names its shared memory after MASTER_ADDR and MASTER_PORT. Another process
    # taking the port between probe and bind is an address-in-use error, which the task's
    # retries (max_failures) resume from the newest checkpoint.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=0),
        datasets=datasets,
    )
    return dict(trainer.fit().return_value or {})


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` or ``mlruns`` made absolute; other URIs unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    if uri and "://" not in uri and not uri.startswith("file:"):
        return os.path.abspath(uri)
    return uri


# --- the worker side ----------------------------------------------------------------------------


def _worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch
    import torch

    from mmflow.train.engines import DDPEngine, DeepSpeedEngine

    task: TrainTask = config["task"]
    cfg = TrainConfig(**config["cfg"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpts = Checkpoints(join(config["work_uri"], "checkpoints"), cfg, rank, world)

    _seed(cfg.seed)  # the same initial weights on every rank
    make = DeepSpeedEngine if cfg.strategy == "deepspeed" else DDPEngine
    model = task.build_model()
    if cfg.compile:
        _compile(model, rank, device)
    runner = make(model, cfg, device, world)
    resumed = ckpts.resume(runner)
    step = saved = resumed["step"]
    _seed(cfg.seed + 1_000_003 * rank + step)  # per rank, and reproducible on resume
    tracker = Tracker(config["tracking_uri"], config["run_id"] if rank == 0 else None)
    if rank == 0:
        note_start(tracker, config, step)
    progress = StepProgress(cfg.max_steps, step, config.get("stage", "train"), rank == 0)
    window = Window(cfg, world, device, getattr(task, "tokens_per_sample", None))
    batches = iter(task.train_batches(rank, world, step))
    last = {"train/loss": resumed["train_loss"]} if resumed.get("train_loss") is not None else {}

    while step < cfg.max_steps:
        for micro in range(cfg.grad_accum):
            if (batch := next(batches, _END)) is _END:
                raise RuntimeError(f"task.train_batches ended at step {step}; it must loop forever")
            batch = _to_device(batch, device)
            window.add(*runner.micro_step(task, batch, last=micro == cfg.grad_accum - 1))
        runner.optimizer_step()
        step += 1
        logged = _every(cfg.log_every, step) or step == cfg.max_steps
        evaluated = _every(cfg.eval_every, step) and step < cfg.max_steps  # the final ones follow
        checkpointed = _every(cfg.checkpoint_every, step) and step < cfg.max_steps
        last = window.flush(lr=runner.lr) if logged else last
        evals = _evaluate(task, runner.full_model(task, rank), cfg, device) if evaluated else {}
        tracker.log({**(last if logged else {}), **evals}, step)
        progress.at(step, last.get("train/loss"))
        if checkpointed:
            saved = ckpts.save(runner, step, last.get("train/loss"))
        if evaluated or checkpointed:  # not every log step: each report may wait ~2 s for Ray
            _ray_report({**last, **evals}, step)

    if saved != step:
        ckpts.save(runner, step, last.get("train/loss"))
    model = runner.full_model(task, rank)  # rank 0's whole model, None elsewhere
    evals = _evaluate(task, model, cfg, device)
    tracker.log(evals, step)
    if model is not None and config["model_uri"] is not None:
        with tempfile.TemporaryDirectory(prefix="mmflow-model-") as tmp:
            task.save(model, tmp)
            Storage().upload_dir(tmp, config["model_uri"])
    counters = _sum_over_ranks(task.data_counters())
    final = {"step": float(step), **{k: v for k, v in last.items() if k == "train/loss"}, **evals}
    final.update({f"data/{k}": float(v) for k, v in counters.items()})
    _ray_report(final, step)  # after the upload: a barrier, so no rank returns before it is done
    progress.at(step, last.get("train/loss"), final=True)
    if rank != 0:
        return None
    # After everything this attempt printed, a token of its own: a retry after a late failure
    # is not taken as seen by an earlier attempt's line.
    token = uuid.uuid4().hex
    send_sync(token)
    return {**final, SYNC_KEY: token}


def _compile(model: nn.Module, rank: int, device) -> None:
    """torch.compile in place: the same module, parameter names and state dict, so engines,
    checkpoints and ``task.save`` see no difference (``_evaluate`` runs it eagerly: other
    shapes, no grads). Where inductor cannot build kernels for the device (see
    ``compile_blocker``) the model trains uncompiled (the same model up to rounding), and rank 0
    says why."""
    blocker = compile_blocker(device)
    if blocker:
        if rank == 0:
            say(f"[train] warning: compile: {blocker}; training uncompiled")
        return
    model.compile()


def compile_blocker(device) -> str | None:
    """Why inductor could not build kernels for ``device``, or None: GPU kernels need Triton,
    CPU kernels the C++ compiler inductor's own search finds (``torch._inductor.config.cpp.cxx``,
    ``$CXX``), asked up front rather than failing at the first step. It finds that a compiler
    runs, not that it can build (headers and all): that, torch.compile reports itself."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "no usable Triton for GPU kernels"
    if device.type != "cpu":  # another accelerator's backend: torch.compile decides
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # inductor moved it: let torch.compile decide at the first step
        return None
    try:
        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or the platform's own compiler checks
        return f"no C++ compiler inductor can use for CPU kernels ({type(e).__name__}; set $CXX)"
    return None


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


# --- eval, save, metrics, progress --------------------------------------------------------------


def _evaluate(task: TrainTask, model: nn.Module | None, cfg: TrainConfig, device) -> dict:
    """``eval/*`` metrics from rank 0's model; {} on the other ranks."""
    import torch

    from mmflow.train.engines import autocast

    if model is None:
        return {}
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(cfg, device), torch.compiler.set_stance("force_eager"):
        out = {f"eval/{k}": float(v) for k, v in task.evaluate(model).items()}
    model.train(was_training)
    return out


def _sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Every rank's counts summed, on every rank (a collective: all ranks call it). Ranks may
    name different keys (a reason only one of them met), hence objects, not one tensor."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return dict(counts)
    every: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, dict(counts))
    total: dict[str, int] = {}
    for rank_counts in every:
        for k, v in (rank_counts or {}).items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def _ray_report(metrics: dict[str, float], step: int) -> None:
    import ray.train

    # Every rank, the same number of times (a barrier); Ray keeps rank 0's.
    ray.train.report({**metrics, "step": step})


# --- small helpers ------------------------------------------------------------------------------


def _to_device(batch: Any, device: torch.device) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
