"""What a training stage gives the harness: a :class:`TrainConfig` and a :class:`TrainTask`.

Importing this module does not import torch, so stage modules can declare their params and
tasks at import time and pipelines validate in a second.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from mmflow.params import Params

if TYPE_CHECKING:
    import torch
    from torch import nn


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
    beta2: float = Field(
        0.999, gt=0, lt=1, description="AdamW's second-moment decay (transformers: 0.95)"
    )
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 = off")
    compile: bool = Field(
        False,
        description="torch.compile the model for training (the first step compiles, about a "
        "minute on 2 CPUs; evaluation and saving run it uncompiled)",
    )
    checkpoint_every: int = Field(500, ge=0, description="steps; 0 = only at the end")
    eval_every: int = Field(0, ge=0, description="steps; 0 = only at the end")
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(2, ge=-1, description="worker-group restarts (Ray FailureConfig)")
    seed: int = 0

    @classmethod
    def with_defaults(cls, name: str, doc: str, **defaults: Any) -> type[TrainConfig]:
        """A subclass whose fields default to ``defaults``, their types, limits and
        descriptions kept (a ``Field(...)`` value replaces a field's whole definition): how a
        training stage states what suits its model in one line per changed setting."""
        from pydantic import create_model
        from pydantic.fields import FieldInfo

        fields: dict[str, Any] = {}
        for key, value in defaults.items():
            if key not in cls.model_fields:
                raise KeyError(f"{name}: TrainConfig has no field {key!r}")
            base = cls.model_fields[key]
            info = (
                value
                if isinstance(value, FieldInfo)
                else FieldInfo.merge_field_infos(base, default=value)
            )
            fields[key] = (base.annotation, info)
        model = create_model(name, __base__=cls, __doc__=doc, **fields)
        model.__module__ = sys._getframe(1).f_globals.get("__name__", cls.__module__)
        return model


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

    def data_counters(self) -> dict[str, int]:
        """This rank's counts about its data (e.g. ``samples_seen``, ``skipped_<reason>``),
        read on every rank at the end of training; ``fit`` returns their sums over ranks as
        ``data/<name>``."""
        return {}

    def save(self, model: nn.Module, out_dir: str) -> None:
        """Write the final model files into the local folder ``out_dir`` (rank 0, same model
        as ``evaluate`` gets); the harness uploads them."""
        import torch

        torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))
