"""The shared training harness: one loop for every training stage.

A stage supplies a :class:`TrainTask` (model, data, loss, eval, save) and a
:class:`TrainConfig`; :func:`fit` runs it on ``ctx.resources.workers`` Ray Train
workers with DDP or DeepSpeed (ZeRO 0-3) and takes care of the rest:

- checkpoints every ``checkpoint_every`` optimizer steps and at the end, under
  ``ctx.work("checkpoints", "step_XXXXXXXX")``. Every rank uploads its part,
  then (after a barrier) rank 0 writes ``_COMPLETE`` last; a folder without it
  is never used. The newest two complete checkpoints are kept.
- resume: every attempt starts from the newest complete checkpoint, so a Ray
  Train restart after a worker failure and a new ``fit`` over the same
  ``work_uri`` both continue where the last checkpoint left off.
- metrics: rank 0 logs ``train/*`` every ``log_every`` steps and ``eval/*`` to the
  stage's MLflow run (when ``ctx.run_id`` is set); Ray Train gets them at eval and
  checkpoint steps and at the end (each ``ray.train.report`` is a barrier that may wait
  ~2 s for the controller, too slow for every log step).
- progress: rank 0 prints a line at most every 5 s and at the end.

``ray.init`` is the caller's business; ``fit`` uses whatever cluster is there.
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from mmflow.progress import format_duration
from mmflow.stage import Params, StageContext
from mmflow.storage import Storage, filesystem, join, normalize

CKPT_PREFIX = "step_"
COMPLETE = "_COMPLETE"  # written last, by rank 0; its JSON says what the checkpoint holds
KEEP_CHECKPOINTS = 2
PROGRESS_INTERVAL_S = 5.0
_END = object()


class TrainConfig(Params):
    """How to train; embed it as a field of a training stage's Params."""

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3 (deepspeed only)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs GPUs
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="micro batch per worker")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 = off")
    checkpoint_every: int = Field(500, ge=0, description="steps; 0 = only at the end")
    eval_every: int = Field(0, ge=0, description="steps; 0 = only at the end")
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(2, ge=-1, description="worker-group restarts (Ray FailureConfig)")
    seed: int = 0


class TrainTask:
    """What a training stage supplies. It is pickled and shipped to every worker."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batches(self, rank: int, world_size: int, start_step: int) -> Iterator[Any]:
        """Endless micro-batches for this rank, starting after ``start_step`` optimizer steps
        (each step takes ``grad_accum`` of them). Tensors, or dicts/lists/tuples of tensors."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, extra float metrics) for one micro-batch, already on the device."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; runs on rank 0 only, in eval mode, without grad, under autocast
        for bf16/fp16. With ZeRO-3 ``model`` is a copy from ``build_model`` holding the
        gathered weights; with DeepSpeed bf16 at ZeRO 0-2 its weights are bf16."""
        return {}

    def save(self, model: nn.Module, out_dir: str) -> None:
        """Write the final model files into the local folder ``out_dir`` (rank 0, same model
        as ``evaluate`` gets); the harness uploads them."""
        torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))


def fit(
    task: TrainTask, cfg: TrainConfig, ctx: StageContext, model_output: str | None = "model"
) -> dict[str, float]:
    """Train ``task`` on Ray Train workers, resuming from ``ctx.work("checkpoints")`` if a
    checkpoint is there, and upload ``task.save``'s files to ``ctx.outputs[model_output]``.

    Returns the final metrics: ``step``, ``train/loss`` and the ``eval/*`` of the final model
    (the MLflow history is already logged; ``ctx.metrics`` is left to the stage). Raises
    ``ray.train.TrainingFailedError`` once workers failed more than ``cfg.max_failures`` times.
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
    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus > 0 else {})}
    fs, ray_path = filesystem(ctx.work("ray_train"))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "task": task,
            "cfg": cfg.model_dump(),
            # absolute: Ray Train runs the workers in a directory of its own
            "work_uri": normalize(ctx.work_uri),
            "tracking_uri": absolute_tracking_uri(ctx.tracking_uri),
            "run_id": ctx.run_id,
            "model_uri": normalize(ctx.outputs[model_output]) if model_output is not None else None,
        },
        scaling_config=ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpus > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=f"train-{uuid.uuid4().hex[:8]}",
            storage_path=ray_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
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


def _worker_loop(config: dict[str, Any]) -> dict[str, float] | None:
    import ray.train
    import ray.train.torch

    task: TrainTask = config["task"]
    cfg = TrainConfig(**config["cfg"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpts = _Checkpoints(join(config["work_uri"], "checkpoints"), cfg, rank, world)

    _seed(cfg.seed)  # the same initial weights on every rank
    make = _DeepSpeedRunner if cfg.strategy == "deepspeed" else _DDPRunner
    runner = make(task.build_model(), cfg, device, world)
    resumed = ckpts.resume(runner)
    step = saved = resumed["step"]
    _seed(cfg.seed + 1_000_003 * rank + step)  # per rank, and reproducible on resume
    tracker = _Tracker(config["tracking_uri"], config["run_id"] if rank == 0 else None)
    progress = _Progress(cfg.max_steps, step, enabled=rank == 0)
    window = _Window(cfg, world, device)
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
        progress.update(step, last.get("train/loss"))
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
    final = {"step": float(step), **{k: v for k, v in last.items() if k == "train/loss"}, **evals}
    _ray_report(final, step)  # after the upload: a barrier, so no rank returns before it is done
    progress.update(step, last.get("train/loss"), force=True)
    return final if rank == 0 else None


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


class _DDPRunner:
    """Model + AdamW + schedule under torch DDP (gloo on CPU, nccl on GPU)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, world: int):
        from torch.nn.parallel import DistributedDataParallel

        self.cfg, self.device = cfg, device
        self.module = model.to(device)
        ids = [device] if device.type == "cuda" else None
        self.model = DistributedDataParallel(self.module, device_ids=ids) if world > 1 else model
        self.optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def micro_step(self, task: TrainTask, batch: Any, last: bool) -> tuple[torch.Tensor, dict]:
        no_sync = not last and self.model is not self.module  # reduce grads only on the last one
        with self.model.no_sync() if no_sync else nullcontext():
            with _autocast(self.cfg, self.device):
                loss, metrics = task.loss(self.model, batch)
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        return loss.detach(), metrics

    def optimizer_step(self) -> None:
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_model(self, task: TrainTask, rank: int) -> nn.Module | None:
        return self.module if rank == 0 else None

    def save(self, local_dir: str, rank: int) -> None:
        parts = ("module", "optimizer", "scheduler", "scaler")
        if rank == 0:
            torch.save({k: getattr(self, k).state_dict() for k in parts}, f"{local_dir}/state.pt")

    def load(self, local_dir: str) -> None:
        state = torch.load(f"{local_dir}/state.pt", map_location=self.device)
        for k, v in state.items():
            getattr(self, k).load_state_dict(v)


class _DeepSpeedRunner:
    """Model + AdamW + schedule in a DeepSpeed engine; the engine does accumulation and clipping."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, world: int):
        import logging

        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg, self.device = cfg, device
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": cfg.precision == "bf16"},
            "fp16": {"enabled": cfg.precision == "fp16"},
            "steps_per_print": 2**31 - 1,
        }
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg)),
            config=ds_config,
        )
        self.model, self.module = self.engine, self.engine.module

    def micro_step(self, task: TrainTask, batch: Any, last: bool) -> tuple[torch.Tensor, dict]:
        with _autocast(self.cfg, self.device):
            loss, metrics = task.loss(self.engine, batch)
        self.engine.backward(loss)  # scales by 1/grad_accum itself
        self.engine.step()  # steps optimizer + schedule only at the accumulation boundary
        return loss.detach(), metrics

    def optimizer_step(self) -> None:
        pass  # done by engine.step() on the last micro-batch

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def full_model(self, task: TrainTask, rank: int) -> nn.Module | None:
        """The whole model on rank 0 for eval/save (None elsewhere). ZeRO-3 shards the weights
        and hooks the module's forward into collectives, so rank 0 gets a plain copy built by
        the task and loaded from the gathered weights; a collective call, on every rank."""
        if self.cfg.zero_stage < 3:
            return self.module if rank == 0 else None
        state = self.engine._zero3_consolidated_16bit_state_dict()  # on rank 0, layer by layer
        if rank != 0:
            return None
        model = task.build_model()
        model.load_state_dict(state)
        return model.to(self.device)

    def save(self, local_dir: str, rank: int) -> None:
        # collective: rank 0 writes the module, every rank its own ZeRO optimizer shard
        self.engine.save_checkpoint(local_dir, tag="ds", save_latest=False)

    def load(self, local_dir: str) -> None:
        path, _ = self.engine.load_checkpoint(local_dir, tag="ds")
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {local_dir}")


def lr_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """LR factor per step: linear warmup over ``warmup_steps``, then cosine decay to 0 at
    ``max_steps``. A plain function, not an object: LambdaLR would checkpoint an object's
    fields and bring back the old ``max_steps`` when a run is resumed with a new one."""
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-d parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


# --- checkpoints --------------------------------------------------------------------------------


def complete_checkpoints(storage: Storage, root: str) -> list[tuple[int, str]]:
    """(step, uri) of the checkpoints under ``root`` that have their ``_COMPLETE`` marker, oldest first."""
    steps = [(_step_of(i.name), i.uri) for i in storage.ls(root) if i.is_dir]
    return sorted((s, u) for s, u in steps if s is not None and storage.exists(join(u, COMPLETE)))


def _step_of(name: str) -> int | None:
    return int(name[len(CKPT_PREFIX) :]) if name.startswith(CKPT_PREFIX) else None


class _Checkpoints:
    """The ``step_XXXXXXXX`` folders under ``root``, as this rank sees them."""

    def __init__(self, root: str, cfg: TrainConfig, rank: int, world: int):
        self.storage, self.root, self.rank = Storage(), root, rank
        self.settings = {"strategy": cfg.strategy}  # what a checkpoint can be loaded into
        if cfg.strategy == "deepspeed":  # ZeRO shards are per stage and per rank
            self.settings.update(zero_stage=cfg.zero_stage, world_size=world)

    def save(self, runner, step: int, train_loss: float | None) -> int:
        uri = join(self.root, f"{CKPT_PREFIX}{step:08d}")
        if self.rank == 0 and self.storage.exists(uri):
            self.storage.delete(uri)  # a partial one left by a failed attempt
        _barrier()
        with tempfile.TemporaryDirectory(prefix="mmflow-ckpt-") as tmp:
            runner.save(tmp, self.rank)
            self.storage.upload_dir(tmp, uri)
        _barrier()  # every rank's files are up
        if self.rank == 0:
            meta = {"step": step, "train_loss": train_loss, "time": time.time(), **self.settings}
            self.storage.write_json(join(uri, COMPLETE), meta)
            self.prune()
        return step

    def prune(self) -> None:
        """Keep the newest KEEP_CHECKPOINTS complete ones; drop older ones, partial or not."""
        complete = complete_checkpoints(self.storage, self.root)
        if not complete:
            return
        keep, newest = {uri for _, uri in complete[-KEEP_CHECKPOINTS:]}, complete[-1][0]
        for info in self.storage.ls(self.root):
            step = _step_of(info.name)
            if info.is_dir and step is not None and step < newest and info.uri not in keep:
                self.storage.delete(info.uri)

    def resume(self, runner) -> dict[str, Any]:
        """Load the newest complete checkpoint (rank 0 picks it for all); returns its
        ``_COMPLETE`` record, or ``{"step": 0}`` when there is none."""
        found = complete_checkpoints(self.storage, self.root) if self.rank == 0 else None
        found = _broadcast(found[-1][1] if found else None)
        if found is None:
            return {"step": 0}
        meta = self.storage.read_json(join(found, COMPLETE))
        if any(meta.get(k) != v for k, v in self.settings.items()):
            then = {k: meta.get(k) for k in self.settings}
            raise RuntimeError(
                f"checkpoint {found} was written with {then}, this run has {self.settings}; "
                f"train with the same settings, or remove {self.root} to start over"
            )
        with tempfile.TemporaryDirectory(prefix="mmflow-ckpt-") as tmp:
            self.storage.download_dir(found, tmp)
            runner.load(tmp)
        if self.rank == 0:
            _say(f"[train] resumed from {found} (step {meta['step']})")
        return meta


# --- eval, save, metrics, progress --------------------------------------------------------------


def _evaluate(task: TrainTask, model: nn.Module | None, cfg: TrainConfig, device) -> dict:
    """``eval/*`` metrics from rank 0's model; {} on the other ranks."""
    if model is None:
        return {}
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(cfg, device):
        out = {f"eval/{k}": float(v) for k, v in task.evaluate(model).items()}
    model.train(was_training)
    return out


class _Window:
    """Train metrics since the last log line; the loss is averaged over all ranks."""

    def __init__(self, cfg: TrainConfig, world: int, device: torch.device):
        self.samples_per_step = cfg.batch_size * cfg.grad_accum * world
        self.steps_per_micro = 1.0 / cfg.grad_accum
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss, self.n, self.extra, self.t0 = 0.0, 0, {}, time.monotonic()

    def add(self, loss: torch.Tensor, metrics: dict[str, float]) -> None:
        self.loss, self.n = self.loss + loss.float(), self.n + 1
        for k, v in metrics.items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)

    def flush(self, lr: float) -> dict[str, float]:
        total = torch.tensor([float(self.loss), self.n], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(total)
        steps_per_s = self.n * self.steps_per_micro / max(time.monotonic() - self.t0, 1e-9)
        out = {
            "train/loss": (total[0] / total[1]).item(),
            "train/lr": lr,
            "train/steps_per_s": steps_per_s,
            "train/samples_per_s": steps_per_s * self.samples_per_step,
            **{f"train/{k}": v / self.n for k, v in self.extra.items()},
        }
        self._reset()
        return out


class _Tracker:
    """Rank 0's MLflow logging (plain MlflowClient; a no-op without a run id)."""

    def __init__(self, tracking_uri: str, run_id: str | None):
        self.tracking_uri, self.run_id, self._client = tracking_uri, run_id, None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id or not metrics:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        try:
            self._client = self._client or MlflowClient(self.tracking_uri)
            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self._client.log_batch(self.run_id, metrics=items[:1000])  # MLflow's batch limit
        except Exception as e:  # a flaky tracking server must not kill a long run
            _say(f"[train] warning: MLflow logging failed: {e}")


def _ray_report(metrics: dict[str, float], step: int) -> None:
    import ray.train

    # Every rank, the same number of times (a barrier); Ray keeps rank 0's.
    ray.train.report({**metrics, "step": step})


class _Progress:
    """``[train] step 120/500 (24%) 3.2 steps/s loss 0.412 ETA 1m58s``, at most every 5 s."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = self.last = time.monotonic()

    def update(self, step: int, loss: float | None, force: bool = False) -> None:
        now = time.monotonic()
        due = now - self.last >= PROGRESS_INTERVAL_S and step < self.total  # the end is forced
        if not self.enabled or not (due or force):
            return
        self.last, pct = now, 100.0 * step / self.total
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = format_duration((self.total - step) / rate) if rate > 0 else "?"
        loss_s = f" loss {loss:.4g}" if loss is not None else ""
        _say(f"[train] step {step}/{self.total} ({pct:.0f}%) {rate:.2f} steps/s{loss_s} ETA {eta}")


# --- small helpers ------------------------------------------------------------------------------


def _say(line: str) -> None:
    """One line to stdout, now. Not print(): Ray Train patches it into a logger that echoes
    each line to both stdout and stderr, so every line would show twice in the job log."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
