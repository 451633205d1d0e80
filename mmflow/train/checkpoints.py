"""Training checkpoints in storage: ``{root}/step_XXXXXXXX/``, complete once ``_COMPLETE`` exists.

Every rank uploads its part (DeepSpeed ZeRO writes a shard per rank), then, after a barrier,
rank 0 writes ``_COMPLETE`` last; a folder without it is never loaded. The newest
``KEEP_CHECKPOINTS`` complete ones are kept. ``_COMPLETE`` records the settings a checkpoint
can be loaded into (strategy, ZeRO stage, world size), so a mismatch fails with a clear message.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from mmflow.progress import say
from mmflow.storage import Storage, join
from mmflow.train.config import TrainConfig

CKPT_PREFIX = "step_"
COMPLETE = "_COMPLETE"  # written last, by rank 0; its JSON says what the checkpoint holds
KEEP_CHECKPOINTS = 2


def complete_checkpoints(storage: Storage, root: str) -> list[tuple[int, str]]:
    """(step, uri) of the checkpoints under ``root`` that have their ``_COMPLETE`` marker, oldest first."""
    steps = [(step_of(i.name), i.uri) for i in storage.ls(root) if i.is_dir]
    return sorted((s, u) for s, u in steps if s is not None and storage.exists(join(u, COMPLETE)))


def step_of(name: str) -> int | None:
    return int(name[len(CKPT_PREFIX) :]) if name.startswith(CKPT_PREFIX) else None


class Checkpoints:
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
        barrier()
        with tempfile.TemporaryDirectory(prefix="mmflow-ckpt-") as tmp:
            runner.save(tmp, self.rank)
            self.storage.upload_dir(tmp, uri)
        barrier()  # every rank's files are up
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
            step = step_of(info.name)
            if info.is_dir and step is not None and step < newest and info.uri not in keep:
                self.storage.delete(info.uri)

    def resume(self, runner) -> dict[str, Any]:
        """Load the newest complete checkpoint (rank 0 picks it for all); returns its
        ``_COMPLETE`` record, or ``{"step": 0}`` when there is none."""
        found = complete_checkpoints(self.storage, self.root) if self.rank == 0 else None
        found = broadcast(found[-1][1] if found else None)
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
            say(f"[train] resumed from {found} (step {meta['step']})")
        return meta


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
