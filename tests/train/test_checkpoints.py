"""Storage checkpoints: ``step_XXXXXXXX/`` folders complete once ``_COMPLETE`` is written last;
resume loads the newest complete one into a real (single-process) DDP engine and returns its
record; incomplete folders are never loaded. Storage is a local tmp folder."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from mmflow.storage import Storage
from mmflow.train.checkpoints import COMPLETE, Checkpoints, complete_checkpoints, step_of
from mmflow.train.config import TrainConfig, TrainTask
from mmflow.train.engines import DDPEngine

CPU = torch.device("cpu")
CFG = TrainConfig(max_steps=20, warmup_steps=4, lr=1e-2)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


class Tiny(TrainTask):
    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {}


def engine(seed: int) -> DDPEngine:
    torch.manual_seed(seed)
    return DDPEngine(Tiny().build_model(), CFG, CPU, world=1)


def train(e: DDPEngine, steps: int) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        e.micro_step(Tiny(), (x, x.sum(1, keepdim=True)), last=True)
        e.optimizer_step()


def weights(e: DDPEngine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in e.module.parameters()]


def test_step_of_reads_the_folder_name():
    assert step_of("step_00000012") == 12
    assert step_of("step_123456789") == 123456789  # past 8 digits still sorts by number
    assert step_of("_work") is None and step_of("latest") is None


def test_save_then_resume_restores_model_optimizer_and_schedule(tmp_path):
    root = str(tmp_path / "checkpoints")
    trained = engine(seed=0)
    train(trained, 3)
    assert Checkpoints(root, CFG, rank=0, world=1).save(trained, step=3, train_loss=0.25) == 3

    folder = tmp_path / "checkpoints" / "step_00000003"
    assert sorted(os.listdir(folder)) == [COMPLETE, "state.pt"]
    record = Storage().read_json(str(folder / COMPLETE))
    assert {k: record[k] for k in ("step", "train_loss", "strategy")} == {
        "step": 3,
        "train_loss": 0.25,
        "strategy": "ddp",
    }

    fresh = engine(seed=1)  # other initial weights, no optimizer state, schedule at 0
    assert not all(torch.equal(a, b) for a, b in zip(weights(fresh), weights(trained), strict=True))
    meta = Checkpoints(root, CFG, rank=0, world=1).resume(fresh)
    assert meta["step"] == 3 and meta["train_loss"] == 0.25
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), weights(trained), strict=True))
    assert fresh.scheduler.last_epoch == 3 and fresh.lr == pytest.approx(trained.lr)
    a, b = fresh.optimizer.state_dict()["state"], trained.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    # both continue identically from here
    train(fresh, 2)
    train(trained, 2)
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), weights(trained), strict=True))


def test_resume_takes_the_newest_complete_one_and_ignores_incomplete_ones(tmp_path):
    root, storage = str(tmp_path / "checkpoints"), Storage()
    ckpts = Checkpoints(root, CFG, rank=0, world=1)
    e = engine(seed=0)
    train(e, 1)
    ckpts.save(e, step=1, train_loss=1.0)
    train(e, 1)
    ckpts.save(e, step=2, train_loss=0.5)
    at_step_2 = weights(e)
    # a newer attempt died mid-upload: its state is there, its marker is not
    train(e, 1)
    with _partial(tmp_path / "checkpoints" / "step_00000003") as f:
        torch.save({"module": e.module.state_dict()}, f)
    storage.write_json(f"{root}/notes/{COMPLETE}", {"step": 99})  # not a step folder
    storage.write_json(f"{root}/step_00000050", {})  # a file, not a folder
    assert [s for s, _ in complete_checkpoints(storage, root)] == [1, 2]

    fresh = engine(seed=1)
    meta = ckpts.resume(fresh)
    assert meta["step"] == 2 and meta["train_loss"] == 0.5
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), at_step_2, strict=True))


def _partial(folder):
    folder.mkdir(parents=True)
    return open(folder / "state.pt", "wb")


def test_only_incomplete_checkpoints_mean_a_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    with _partial(root / "step_00000005") as f:
        f.write(b"half a checkpoint")
    before = engine(seed=3)
    start = weights(before)
    assert Checkpoints(str(root), CFG, rank=0, world=1).resume(before) == {"step": 0}
    assert all(torch.equal(a, b) for a, b in zip(weights(before), start, strict=True))


def test_saving_over_a_partial_folder_replaces_it_and_prunes_old_ones(tmp_path):
    root = tmp_path / "checkpoints"
    with _partial(root / "step_00000004") as f:
        f.write(b"left by a failed attempt")
    (root / "step_00000004" / "stale.bin").write_bytes(b"x")
    ckpts, e = Checkpoints(str(root), CFG, rank=0, world=1), engine(seed=0)
    for step in (1, 2, 3, 4):
        train(e, 1)
        ckpts.save(e, step=step, train_loss=None)
    assert sorted(os.listdir(root)) == ["step_00000003", "step_00000004"]
    assert sorted(os.listdir(root / "step_00000004")) == [COMPLETE, "state.pt"]
    assert Storage().read_json(str(root / "step_00000004" / COMPLETE))["train_loss"] is None


def test_a_deepspeed_checkpoint_records_and_checks_zero_stage_and_world_size(tmp_path):
    root, storage = str(tmp_path / "checkpoints"), Storage()
    ds = TrainConfig(strategy="deepspeed", zero_stage=2)

    class Files:  # what an engine's save/load sees: a local folder
        loaded: str | None = None

        def save(self, local_dir, rank):
            with open(os.path.join(local_dir, f"shard_rank{rank}.pt"), "wb") as f:
                f.write(b"zero shard")

        def load(self, local_dir):
            Files.loaded = sorted(os.listdir(local_dir))

    Checkpoints(root, ds, rank=0, world=4).save(Files(), step=7, train_loss=0.1)
    record = storage.read_json(f"{root}/step_00000007/{COMPLETE}")
    assert (record["strategy"], record["zero_stage"], record["world_size"]) == ("deepspeed", 2, 4)

    assert Checkpoints(root, ds, rank=0, world=4).resume(Files())["step"] == 7
    assert Files.loaded == [COMPLETE, "shard_rank0.pt"]
    with pytest.raises(RuntimeError, match=r"'world_size': 4.*'world_size': 2.*remove"):
        Checkpoints(root, ds, rank=0, world=2).resume(Files())
    zero3 = TrainConfig(strategy="deepspeed", zero_stage=3)
    with pytest.raises(RuntimeError, match=r"'zero_stage': 2.*'zero_stage': 3"):
        Checkpoints(root, zero3, rank=0, world=4).resume(Files())


def test_ranks_other_than_zero_upload_their_part_but_write_no_marker(tmp_path):
    root = str(tmp_path / "checkpoints")
    ds = TrainConfig(strategy="deepspeed", zero_stage=2)

    class Shard:
        def save(self, local_dir, rank):
            with open(os.path.join(local_dir, f"shard_rank{rank}.pt"), "wb") as f:
                f.write(b"zero shard")

    Checkpoints(root, ds, rank=1, world=2).save(Shard(), step=3, train_loss=0.1)
    assert os.listdir(os.path.join(root, "step_00000003")) == ["shard_rank1.pt"]
    assert complete_checkpoints(Storage(), root) == []
