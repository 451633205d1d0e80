"""The two ways a model trains on each worker, behind one interface.

An engine holds the model, optimizer and schedule, and offers ``micro_step`` (forward and
backward of one micro-batch), ``optimizer_step``, ``lr``, ``full_model`` (rank 0's whole model
for eval and saving), and ``save``/``load`` of its state into a local folder:

- :class:`DDPEngine`: torch DDP (gloo on CPU, nccl on GPU), AdamW, warmup + cosine;
- :class:`DeepSpeedEngine`: a DeepSpeed engine (ZeRO 0-3, bf16/fp16), same optimizer and schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from mmflow.train.config import TrainConfig, TrainTask


class DDPEngine:
    """Model + AdamW + schedule under torch DDP (gloo on CPU, nccl on GPU)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, world: int):
        from torch.nn.parallel import DistributedDataParallel

        self.cfg, self.device = cfg, device
        self.module = model.to(device)
        ids = [device] if device.type == "cuda" else None
        self.model = DistributedDataParallel(self.module, device_ids=ids) if world > 1 else model
        self.optimizer = adamw(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def micro_step(self, task: TrainTask, batch: Any, last: bool) -> tuple[torch.Tensor, dict]:
        no_sync = not last and self.model is not self.module  # reduce grads only on the last one
        with self.model.no_sync() if no_sync else nullcontext():
            with autocast(self.cfg, self.device):
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
        # plain tensors and numbers only: nothing in a checkpoint folder is unpickled as code
        state = torch.load(f"{local_dir}/state.pt", map_location=self.device, weights_only=True)
        for k, v in state.items():
            getattr(self, k).load_state_dict(v)


class DeepSpeedEngine:
    """Model + AdamW + schedule in a DeepSpeed engine; the engine does accumulation and clipping."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, world: int):
        import logging

        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if device.type == "cpu":
            _no_shm_extension()
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
        optimizer = adamw(model, cfg)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg)),
            config=ds_config,
        )
        self.model, self.module = self.engine, self.engine.module

    def micro_step(self, task: TrainTask, batch: Any, last: bool) -> tuple[torch.Tensor, dict]:
        with autocast(self.cfg, self.device):
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


def _no_shm_extension() -> None:
    """On CPU, DeepSpeed's communication backend compiles a C++ shared-memory all-reduce
    (``deepspeed_shm_comm``) on first use: minutes on a small machine, and a compile killed
    half-way leaves a lock file that hangs the next run. Its gloo fallback, already in torch,
    does the same reductions, and the shm kernel is only an intra-node speed-up (GPU runs use
    NCCL and never build it). So mmflow does without it; if DeepSpeed's internals move, the
    default stays."""
    import importlib

    try:  # by module path: `deepspeed.comm.torch` as an attribute is the torch package itself
        ds_torch = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_torch, "build_shm_op"):
            ds_torch.build_shm_op = lambda: None
    except ImportError:  # pragma: no cover - a future DeepSpeed
        pass


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


def adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Both engines' optimizer: AdamW over :func:`param_groups`, ``cfg``'s lr and beta2."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2)
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-d parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def autocast(cfg: TrainConfig, device: torch.device):
    """The forward's autocast for ``cfg.precision`` (a no-op for fp32)."""
    if cfg.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
