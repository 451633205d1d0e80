"""The training harness on a real (local) Ray cluster with real DeepSpeed, on CPU.

The task: a 2-layer MLP regressing a fixed random linear target, so the loss
falls fast and a trained model is easy to tell from an untrained one.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
from pydantic import ValidationError
from torch import nn

from mmflow.stage import Resources, StageContext
from mmflow.storage import Storage
from mmflow.train import TrainConfig, TrainTask, complete_checkpoints, fit
from mmflow.train.checkpoints import Checkpoints
from mmflow.train.engines import lr_schedule
from mmflow.train.harness import _compile, _to_device, absolute_tracking_uri, compile_blocker
from mmflow.train.reporting import StepProgress

DIM = 8

# The workers cannot import this test module: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def target_weights() -> torch.Tensor:
    return torch.randn(DIM, 1, generator=torch.Generator().manual_seed(1234))


class Regression(TrainTask):
    """y = x @ w. Writes "rank start_step" to ``log_dir/starts.txt`` whenever data starts,
    and can fail once, at ``fail_at_step`` on ``fail_rank``: ``exit`` kills the process
    (a lost worker), ``raise`` raises (a bug); ``log_dir/failed`` keeps it to once."""

    def __init__(
        self,
        log_dir: str,
        batch_size: int = 16,
        grad_accum: int = 1,
        fail_at_step=None,
        fail_rank: int = 1,
        fail_mode: str = "exit",
    ):
        self.log_dir, self.batch_size, self.grad_accum = log_dir, batch_size, grad_accum
        self.fail_at_step, self.fail_rank, self.fail_mode = fail_at_step, fail_rank, fail_mode
        self.w = target_weights()

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 1))

    def train_batches(self, rank, world_size, start_step):
        with open(os.path.join(self.log_dir, "starts.txt"), "a") as f:
            f.write(f"{rank} {start_step}\n")
        gen = torch.Generator().manual_seed(1000 + 7919 * rank + start_step)
        micro = 0
        while True:
            step = start_step + micro // self.grad_accum
            if step == self.fail_at_step and rank == self.fail_rank:
                self._maybe_fail()
            x = torch.randn(self.batch_size, DIM, generator=gen)
            yield {"x": x, "y": x @ self.w}
            micro += 1

    def _maybe_fail(self):
        marker = os.path.join(self.log_dir, "failed")
        if os.path.exists(marker):
            return
        open(marker, "w").close()
        if self.fail_mode == "exit":
            os._exit(1)
        raise RuntimeError("injected failure")

    def loss(self, model, batch):
        pred = model(batch["x"])
        loss = nn.functional.mse_loss(pred.float(), batch["y"])
        return loss, {"pred_std": pred.float().std().item()}

    def evaluate(self, model):
        x = torch.randn(256, DIM, generator=torch.Generator().manual_seed(99))
        return {"mse": nn.functional.mse_loss(model(x).float(), x @ self.w).item()}

    def starts(self) -> list[tuple[int, int]]:
        with open(os.path.join(self.log_dir, "starts.txt")) as f:
            return sorted(tuple(map(int, line.split())) for line in f)


def initial_mse() -> float:
    """What predicting 0 costs: about what an untrained model scores."""
    return float(target_weights().pow(2).sum())


def make_ctx(tmp_path, workers=2, cpus=1.0, gpus=0.0, tracking_uri="", run_id=None) -> StageContext:
    return StageContext(
        pipeline="p",
        stage="train",
        params=None,
        resources=Resources(cpus=cpus, gpus=gpus, workers=workers),
        inputs={},
        outputs={"model": str(tmp_path / "out" / "model")},
        work_uri=str(tmp_path / "work"),
        storage=Storage(),
        tracking_uri=tracking_uri,
        run_id=run_id,
    )


def checkpoint_steps(ctx: StageContext) -> list[int]:
    return [step for step, _ in complete_checkpoints(ctx.storage, ctx.work("checkpoints"))]


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The session's local Ray (tests/conftest.py): 2 CPUs, one per training worker."""
    yield ray_session


def test_deepspeed_zero2_recovers_from_a_lost_worker(ray_cluster, tmp_path):
    task = Regression(str(tmp_path), fail_at_step=25, fail_rank=1, fail_mode="exit")
    cfg = TrainConfig(
        strategy="deepspeed",
        zero_stage=2,
        max_steps=40,
        batch_size=16,
        lr=1e-2,
        warmup_steps=5,
        checkpoint_every=10,
        eval_every=20,
        log_every=5,
        max_failures=1,
    )
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("harness")).info.run_id
    ctx = make_ctx(tmp_path, tracking_uri=uri, run_id=run)
    final = fit(task, cfg, ctx)

    assert os.path.exists(tmp_path / "failed")  # the failure did happen
    assert final["step"] == 40
    # the restart is in the stage's MLflow run: where it continued from, and how many
    restarts = client.get_metric_history(run, "train/restarted_at_step")
    assert [(m.step, m.value) for m in restarts] == [(20, 20.0)]
    assert client.get_run(run).data.tags["mmflow.train_restarts"] == "1"
    # first attempt from 0, the restart from the last complete checkpoint (20), on both ranks
    assert task.starts() == [(0, 0), (0, 20), (1, 0), (1, 20)]
    assert checkpoint_steps(ctx) == [30, 40]  # only the newest two are kept
    assert final["eval/mse"] < 0.2 * initial_mse()
    assert final["train/loss"] < 0.2 * initial_mse()
    assert os.path.exists(tmp_path / "out" / "model" / "model.pt")


class WhereItRan(Regression):
    """Regression that also notes, at each data start, whether it runs in an actor (a Ray
    Train worker) or a plain task."""

    def train_batches(self, rank, world_size, start_step):
        actor = ray.get_runtime_context().get_actor_id()
        with open(os.path.join(self.log_dir, "where.txt"), "a") as f:
            f.write(("actor" if actor else "task") + "\n")
        yield from super().train_batches(rank, world_size, start_step)


def test_one_worker_trains_in_one_task_and_recovers_from_a_lost_process(ray_cluster, tmp_path):
    """workers: 1 runs the loop in one Ray task (no Ray Train controller and its actors); a
    lost process is retried like a lost worker group, from the newest complete checkpoint."""
    from mlflow import MlflowClient

    task = WhereItRan(str(tmp_path), fail_at_step=25, fail_rank=0, fail_mode="exit")
    cfg = TrainConfig(
        strategy="deepspeed", zero_stage=2, max_steps=40, batch_size=16, lr=1e-2,
        warmup_steps=5, checkpoint_every=10, log_every=5, max_failures=1,
    )  # fmt: skip
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("harness")).info.run_id
    ctx = make_ctx(tmp_path, workers=1, tracking_uri=uri, run_id=run)
    final = fit(task, cfg, ctx)

    assert os.path.exists(tmp_path / "failed") and final["step"] == 40
    assert task.starts() == [(0, 0), (0, 20)]
    assert open(tmp_path / "where.txt").read().split() == ["task", "task"]
    restarts = client.get_metric_history(run, "train/restarted_at_step")
    assert [(m.step, m.value) for m in restarts] == [(20, 20.0)]
    assert client.get_run(run).data.tags["mmflow.train_restarts"] == "1"
    assert final["eval/mse"] < 0.2 * initial_mse()
    assert os.path.exists(tmp_path / "out" / "model" / "model.pt")

    # with no retries left, the task's error is the error raised in the loop
    broken = Regression(str(tmp_path / "b"), fail_at_step=5, fail_rank=0, fail_mode="raise")
    os.makedirs(tmp_path / "b")
    ctx = make_ctx(tmp_path / "b", workers=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        fit(broken, cfg.model_copy(update={"max_failures": 0}), ctx)


def test_rerun_resumes_from_the_last_checkpoint(ray_cluster, tmp_path):
    """Also the ZeRO-3 + bf16 path: sharded weights gathered for eval and for the saved model."""
    cfg = TrainConfig(
        strategy="deepspeed",
        zero_stage=3,
        precision="bf16",
        max_steps=30,
        batch_size=16,
        lr=1e-2,
        warmup_steps=5,
        checkpoint_every=10,
        log_every=5,
        max_failures=0,
    )
    ctx = make_ctx(tmp_path)
    broken = Regression(str(tmp_path), fail_at_step=15, fail_rank=0, fail_mode="raise")
    with pytest.raises(ray.train.TrainingFailedError, match="injected failure"):
        fit(broken, cfg, ctx)
    assert checkpoint_steps(ctx) == [10]

    fixed = Regression(str(tmp_path))
    final = fit(fixed, cfg, ctx)
    assert final["step"] == 30
    assert fixed.starts() == [(0, 0), (0, 10), (1, 0), (1, 10)]
    assert checkpoint_steps(ctx) == [20, 30]
    assert final["eval/mse"] < 0.2 * initial_mse()
    model = fixed.build_model()  # the saved weights are whole, not ZeRO-3 shards
    model.load_state_dict(torch.load(tmp_path / "out" / "model" / "model.pt"))
    with torch.no_grad():  # the harness evaluated under bf16 autocast, this is fp32
        assert fixed.evaluate(model)["mse"] == pytest.approx(final["eval/mse"], rel=0.05)


def test_ddp_grad_accum_saves_model_and_logs_to_mlflow(ray_cluster, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # a relative store, as the default config has: the workers
    tracking_uri = "sqlite:///mlflow.db"  # run elsewhere, fit must pin it to this directory
    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    cfg = TrainConfig(
        strategy="ddp",
        grad_accum=2,
        max_steps=30,
        batch_size=8,
        lr=1e-2,
        warmup_steps=3,
        checkpoint_every=0,
        eval_every=10,
        log_every=5,
    )
    ctx = make_ctx(tmp_path, tracking_uri=tracking_uri, run_id=run_id)
    task = Regression(str(tmp_path), batch_size=8, grad_accum=2)
    final = fit(task, cfg, ctx)

    assert final["step"] == 30
    assert checkpoint_steps(ctx) == [30]  # checkpoint_every=0: only the final one
    model = task.build_model()
    model.load_state_dict(torch.load(tmp_path / "out" / "model" / "model.pt"))
    assert task.evaluate(model)["mse"] == pytest.approx(final["eval/mse"], rel=1e-4)

    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == [5, 10, 15, 20, 25, 30]
    assert loss[-1].value < 0.2 * loss[0].value
    assert [m.step for m in client.get_metric_history(run_id, "eval/mse")] == [10, 20, 30]
    for name in ("train/lr", "train/steps_per_s", "train/samples_per_s", "train/pred_std"):
        assert len(client.get_metric_history(run_id, name)) == 6, name


class CompiledRegression(Regression):
    """Counts the graphs torch.compile has built in this process, and what evaluating added."""

    def evaluate(self, model):
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        out = super().evaluate(model)
        return {**out, "graphs": before, "eval_graphs": counters["stats"]["unique_graphs"] - before}


def test_compile_trains_the_compiled_model_and_saves_plain_weights(ray_cluster, tmp_path):
    """One DeepSpeed ZeRO-2 worker with ``compile``: training runs compiled graphs, evaluation
    runs eagerly (a new batch shape builds none), the weights save under the module's own names."""
    cfg = TrainConfig(strategy="deepspeed", zero_stage=2, compile=True, max_steps=40,
                      batch_size=16, lr=1e-2, warmup_steps=3, checkpoint_every=20)  # fmt: skip
    task = CompiledRegression(str(tmp_path))
    final = fit(task, cfg, make_ctx(tmp_path, workers=1, cpus=2))

    assert final["step"] == 40 and final["eval/graphs"] >= 1 and final["eval/eval_graphs"] == 0
    assert final["eval/mse"] < 0.2 * initial_mse()
    state = torch.load(tmp_path / "out" / "model" / "model.pt")
    model = task.build_model()
    model.load_state_dict(state)  # no `_orig_mod.` prefixes
    assert Regression.evaluate(task, model)["mse"] == pytest.approx(final["eval/mse"], rel=1e-4)


def test_compile_without_a_compiler_inductor_can_use_trains_uncompiled(monkeypatch, capsys):
    """Asked before training: a CPU run with no C++ compiler inductor's search can find is told
    why and left eager, rather than failing at its first step."""
    import shutil

    from torch._inductor import config as inductor

    cpu = torch.device("cpu")
    if shutil.which(os.environ.get("CXX", "g++")):
        assert compile_blocker(cpu) is None
    assert compile_blocker(torch.device("meta")) is None  # not CPU or CUDA: torch.compile decides
    monkeypatch.setattr(inductor.cpp, "cxx", ("mmflow-no-such-cxx",))
    assert "C++ compiler" in compile_blocker(cpu)
    model = torch.nn.Linear(2, 1)
    _compile(model, 0, cpu)
    assert model._compiled_call_impl is None
    assert "compile: no C++ compiler" in capsys.readouterr().out


def test_config_validation(tmp_path):
    with pytest.raises(ValidationError, match="zero_stage"):
        TrainConfig(strategy="deepspeed", zero_stage=5)
    with pytest.raises(ValidationError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValidationError, match="max_step"):
        TrainConfig(max_step=10)  # typo: unknown keys are errors
    with pytest.raises(ValueError, match="fp16.*needs GPUs"):
        fit(Regression(str(tmp_path)), TrainConfig(precision="fp16"), make_ctx(tmp_path))
    with pytest.raises(KeyError, match="weights"):
        fit(Regression(str(tmp_path)), TrainConfig(), make_ctx(tmp_path), model_output="weights")


def test_lr_schedule_warms_up_then_decays():
    sched = lr_schedule(TrainConfig(max_steps=100, warmup_steps=10))
    lrs = [sched(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] < 0.01


def test_to_device_handles_nested_batches():
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), [torch.ones(1)]), "id": "a"}
    out = _to_device(batch, torch.device("cpu"))
    assert out["id"] == "a" and isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list)
    assert torch.equal(out["x"], batch["x"])


def test_prune_keeps_newest_two_complete_checkpoints(tmp_path):
    storage, root = Storage(), str(tmp_path / "checkpoints")
    for step, complete in [(10, True), (20, True), (25, False), (30, True), (40, False)]:
        storage.write_json(f"{root}/step_{step:08d}/state.json", {})
        if complete:
            storage.write_json(f"{root}/step_{step:08d}/_COMPLETE", {"step": step})
    Checkpoints(root, TrainConfig(), rank=0, world=1).prune()
    assert [s for s, _ in complete_checkpoints(storage, root)] == [20, 30]
    # the partial one older than the newest complete goes; a newer partial stays (to be redone)
    assert sorted(i.name for i in storage.ls(root)) == [
        "step_00000020",
        "step_00000030",
        "step_00000040",
    ]


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path):
    storage, root = Storage(), str(tmp_path / "checkpoints")
    storage.write_json(f"{root}/step_00000010/_COMPLETE", {"step": 10, "strategy": "ddp"})
    cfg = TrainConfig(strategy="deepspeed")
    with pytest.raises(RuntimeError, match="strategy.*ddp.*remove"):
        Checkpoints(root, cfg, rank=0, world=1).resume(runner=None)
    assert Checkpoints(str(tmp_path / "none"), cfg, rank=0, world=1).resume(None) == {"step": 0}


def test_progress_line(capsys):
    """Rank 0's steps as a bar (plain lines here: no console, not in a worker)."""
    progress = StepProgress(total=500, start=100, desc="train", enabled=True)
    progress.at(120, loss=0.41234)
    line = capsys.readouterr().out
    assert re.fullmatch(
        r"\[train\] 120/500 steps \(24%\) [\d.]+ steps/s elapsed 0s ETA \S+ loss 0\.4123\n", line
    )
    progress.at(121, loss=0.4)  # within 5 s of the last line: silent
    assert capsys.readouterr().out == ""
    StepProgress(500, 0, "train", enabled=False).at(500, 0.1, final=True)  # other ranks
    assert capsys.readouterr().out == ""


def test_absolute_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("mlruns") == f"{tmp_path}/mlruns"
    for uri in ("sqlite:////abs/m.db", "http://mlflow:5000", "file:///abs/mlruns", ""):
        assert absolute_tracking_uri(uri) == uri


class CountingRegression(Regression):
    """Each rank counts the batches it made and one skip reason of its own."""

    def train_batches(self, rank, world_size, start_step):
        self.batches, self.rank = 0, rank
        for batch in super().train_batches(rank, world_size, start_step):
            self.batches += 1
            yield batch

    def data_counters(self):
        return {"samples_seen": self.batches * self.batch_size, f"skipped_rank{self.rank}": 1}


def test_data_counters_are_summed_over_ranks(ray_cluster, tmp_path):
    cfg = TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, checkpoint_every=0, log_every=1)
    final = fit(CountingRegression(str(tmp_path), batch_size=4), cfg, make_ctx(tmp_path))
    assert final["data/samples_seen"] == 2 * 3 * 4  # 2 ranks, 3 steps of 4
    assert final["data/skipped_rank0"] == final["data/skipped_rank1"] == 1
