"""Rank 0's reports during training: the window of train metrics, MLflow logging, restarts
and the step progress (used by :mod:`mmflow.train.harness`'s worker loop)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mmflow.progress import Progress, say
from mmflow.storage import Storage, join
from mmflow.train.config import TrainConfig

if TYPE_CHECKING:
    import torch


class Window:
    """Train metrics since the last log line; the loss is averaged over all ranks."""

    def __init__(
        self, cfg: TrainConfig, world: int, device: torch.device, tokens: int | None = None
    ):
        self.samples_per_step = cfg.batch_size * cfg.grad_accum * world
        self.tokens_per_sample = tokens  # sequence models: tokens/s beside samples/s
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
        import torch
        import torch.distributed as dist

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
        if self.tokens_per_sample:
            out["train/tokens_per_s"] = out["train/samples_per_s"] * self.tokens_per_sample
        self._reset()
        return out


class Tracker:
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
            say(f"[train] warning: MLflow logging failed: {e}")

    def restarted(self, step: int) -> int:
        """Record a restart at ``step``: the metric ``train/restarted_at_step`` and the tag
        ``mmflow.train_restarts`` (the metric's history length); returns that count (0: none
        recorded, no run or a failing server)."""
        if not self.run_id:
            return 0
        self.log({"train/restarted_at_step": float(step)}, step)
        try:
            history = self._client.get_metric_history(self.run_id, "train/restarted_at_step")
            self._client.set_tag(self.run_id, "mmflow.train_restarts", str(len(history)))
            return len(history)
        except Exception as e:
            say(f"[train] warning: MLflow logging failed: {e}")
            return 0


def note_start(tracker: Tracker, config: dict[str, Any], step: int) -> None:
    """Rank 0, at every worker-group start: a restart (after a failure of this ``fit``, which
    left its marker, or a new ``fit`` resuming a checkpoint) is recorded in MLflow."""
    storage, marker = Storage(), join(config["work_uri"], "train_starts", config["fit_id"])
    if step > 0 or storage.exists(marker):
        restarts = tracker.restarted(step)
        say(f"[train] restarted at step {step} (restart {restarts or '?'} of this run)")
    else:
        storage.write_json(marker, {"time": time.time()})


class StepProgress:
    """Rank 0's steps: ``[stage] 120/500 steps (24%) 3.2 steps/s ... ETA 1m58s loss 0.412``;
    the steps of an earlier attempt (a resume) count in done, not in the rate."""

    def __init__(self, total: int, start: int, desc: str, enabled: bool):
        self.bar = Progress(total, desc, unit="steps", initial=start) if enabled else None

    def at(self, step: int, loss: float | None, final: bool = False) -> None:
        if self.bar is None:
            return
        extra = f"loss {loss:.4g}" if loss is not None else ""
        self.bar.set(step, extra)
        if final:
            self.bar.close(extra)
