"""The engines in one process: the warmup + cosine schedule, weight-decay groups, DDPEngine's
accumulation, clipping and precision, and DeepSpeedEngine's configuration (ZeRO stage,
precision, accumulation, clipping) over a one-process gloo group, without Ray."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from mmflow.train.config import TrainConfig, TrainTask
from mmflow.train.engines import DDPEngine, autocast, lr_schedule, param_groups

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


class Tiny(TrainTask):
    """Linear -> LayerNorm -> Linear regression; its 1-d parameters are biases and norm weights."""

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {"n": float(len(x))}


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return x, x @ torch.arange(1.0, 5.0).view(4, 1)


def grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """A one-process gloo group (what DDP and DeepSpeed need), torn down after the module."""
    import torch.distributed as dist

    rendezvous = tmp_path_factory.mktemp("gloo") / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    old = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed reads it; a launcher would set it
    yield dist
    dist.destroy_process_group()
    if old is None:
        os.environ.pop("LOCAL_RANK", None)
    else:
        os.environ["LOCAL_RANK"] = old


# --- schedule and parameter groups ------------------------------------------------------------------


def test_lr_schedule_values():
    f = lr_schedule(TrainConfig(max_steps=110, warmup_steps=10))
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup
    assert f(10) == pytest.approx(1.0)  # the cosine starts at the peak
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(60) == pytest.approx(0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(500) == pytest.approx(0.0, abs=1e-12)  # past max_steps it stays at 0
    decay = [f(s) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_lr_schedule_without_warmup_and_when_warmup_is_everything():
    no_warmup = lr_schedule(TrainConfig(max_steps=4, warmup_steps=0))
    assert [no_warmup(s) for s in range(5)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    )
    # warmup over every step: a linear ramp to the peak, and no division by zero after it
    only_warmup = lr_schedule(TrainConfig(max_steps=5, warmup_steps=5))
    assert [only_warmup(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_a_resumed_run_follows_its_own_max_steps():
    """The schedule is a plain function, so a checkpoint does not carry the old max_steps."""
    old = DDPEngine(Tiny().build_model(), TrainConfig(max_steps=20, warmup_steps=0, lr=1.0), CPU, 1)
    for _ in range(10):
        old.micro_step(Tiny(), data(8), last=True)
        old.optimizer_step()
    state = old.scheduler.state_dict()
    new_cfg = TrainConfig(max_steps=40, warmup_steps=0, lr=1.0)
    new = DDPEngine(Tiny().build_model(), new_cfg, CPU, 1)
    new.optimizer.load_state_dict(old.optimizer.state_dict())
    new.scheduler.load_state_dict(state)
    new.micro_step(Tiny(), data(8), last=True)
    new.optimizer_step()
    assert new.lr == pytest.approx(lr_schedule(new_cfg)(11))
    assert new.lr != pytest.approx(lr_schedule(TrainConfig(max_steps=20, warmup_steps=0))(11))


def test_param_groups_exclude_biases_norms_and_frozen_parameters():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv1d(8, 2, 3))
    model[0].weight.requires_grad_(False)  # frozen: in no group
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model[1].weight, model[3].weight])
    assert ids(no_decay["params"]) == ids(
        [model[1].bias, model[2].weight, model[2].bias, model[3].bias]
    )


def test_adamw_decays_only_the_decay_group():
    """A step with zero gradients moves nothing but AdamW's decoupled decay: the 2-d weights
    shrink by lr * weight_decay, biases and norm weights stay."""
    cfg = TrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, max_steps=10, grad_clip=0.0)
    e = DDPEngine(Tiny().build_model(), cfg, CPU, 1)
    assert {g["betas"] for g in e.optimizer.param_groups} == {(0.9, 0.999)}  # beta2's default
    before = {n: p.detach().clone() for n, p in e.module.named_parameters()}
    zero = sum(p.sum() for p in e.module.parameters()) * 0.0
    zero.backward()
    e.optimizer_step()
    for n, p in e.module.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        assert torch.allclose(p.detach(), before[n] * factor), n


# --- DDPEngine ----------------------------------------------------------------------------------------


def test_ddp_engine_accumulates_micro_batches_into_the_full_batch_gradient():
    x, y = data(16)
    whole = DDPEngine(Tiny().build_model(), TrainConfig(grad_accum=1), CPU, 1)
    whole.micro_step(Tiny(), (x, y), last=True)
    split = DDPEngine(Tiny().build_model(), TrainConfig(grad_accum=4), CPU, 1)
    assert split.model is split.module  # one worker: no DDP wrapper
    for i in range(4):
        loss, metrics = split.micro_step(
            Tiny(), (x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]), i == 3
        )
        assert not loss.requires_grad and metrics == {"n": 4.0}
    for a, b in zip(grads(whole.module), grads(split.module), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    split.optimizer_step()
    assert all(p.grad is None for p in split.module.parameters())  # cleared for the next step


def test_ddp_engine_steps_the_schedule_once_per_optimizer_step():
    cfg = TrainConfig(lr=1e-2, warmup_steps=4, max_steps=10)
    e, f = DDPEngine(Tiny().build_model(), cfg, CPU, 1), lr_schedule(cfg)
    seen = [e.lr]
    for _ in range(6):
        e.micro_step(Tiny(), data(8), last=True)
        e.optimizer_step()
        seen.append(e.lr)
    assert seen == pytest.approx([1e-2 * f(s) for s in range(7)])


def test_ddp_engine_clips_the_gradient_norm_before_the_step():
    norms: list[float] = []

    def record(optimizer, args, kwargs):  # the gradients the optimizer is about to apply
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norms.append(float(torch.stack([p.grad.norm() for p in params]).norm()))

    for clip in (0.0, 0.01):
        e = DDPEngine(Tiny().build_model(), TrainConfig(grad_clip=clip), CPU, 1)
        e.optimizer.register_step_pre_hook(record)
        e.micro_step(Tiny(), data(8), last=True)
        e.optimizer_step()
    unclipped, clipped = norms
    assert unclipped > 1.0 and clipped == pytest.approx(0.01, rel=1e-3)


def test_autocast_follows_the_precision():
    layer, x = nn.Linear(4, 4), torch.randn(2, 4)
    with autocast(TrainConfig(precision="fp32"), CPU):
        assert layer(x).dtype == torch.float32
    with autocast(TrainConfig(precision="bf16"), CPU):
        assert layer(x).dtype == torch.bfloat16
    e = DDPEngine(Tiny().build_model(), TrainConfig(precision="bf16"), CPU, 1)
    e.micro_step(Tiny(), data(8), last=True)  # bf16 forward, fp32 weights and gradients
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in e.module.parameters())


def test_ddp_engine_save_load_and_full_model(tmp_path):
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=10)
    a = DDPEngine(Tiny().build_model(), cfg, CPU, 1)
    for _ in range(3):
        a.micro_step(Tiny(), data(8), last=True)
        a.optimizer_step()
    a.save(str(tmp_path), rank=1)
    assert os.listdir(tmp_path) == []  # only rank 0 writes the DDP state
    a.save(str(tmp_path), rank=0)
    torch.manual_seed(5)
    b = DDPEngine(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1)), cfg, CPU, 1)
    b.load(str(tmp_path))
    assert b.lr == pytest.approx(a.lr) and b.scheduler.last_epoch == 3
    for p, q in zip(a.module.parameters(), b.module.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.full_model(Tiny(), rank=0) is a.module and a.full_model(Tiny(), rank=1) is None


def test_ddp_wrapper_reduces_only_on_the_last_micro_batch(gloo):
    """world > 1 wraps the module in DDP (here over a one-process group): accumulation under
    no_sync gives the same gradient as one full batch."""
    from torch.nn.parallel import DistributedDataParallel

    x, y = data(16)
    e = DDPEngine(Tiny().build_model(), TrainConfig(grad_accum=2), CPU, world=2)
    assert isinstance(e.model, DistributedDataParallel) and e.model.module is e.module
    e.micro_step(Tiny(), (x[:8], y[:8]), last=False)
    e.micro_step(Tiny(), (x[8:], y[8:]), last=True)
    ref = Tiny().build_model()
    ((ref(x) - y) ** 2).mean().backward()
    for a, b in zip(grads(e.module), grads(ref), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    e.optimizer_step()


# --- DeepSpeedEngine ----------------------------------------------------------------------------------
# Real DeepSpeed on the CPU accelerator: importing it and loading its shared-memory comm op
# take most of this module's time (~8 s on an idle machine).


def test_deepspeed_engine_zero2_bf16_config_accumulation_and_full_model(gloo):
    from mmflow.train.engines import DeepSpeedEngine

    cfg = TrainConfig(
        strategy="deepspeed",
        zero_stage=2,
        precision="bf16",
        batch_size=4,
        grad_accum=3,
        grad_clip=0.5,
        lr=1e-2,
        warmup_steps=4,
        max_steps=10,
        weight_decay=0.02,
        beta2=0.95,
    )
    e = DeepSpeedEngine(Tiny().build_model(), cfg, CPU, world=1)
    ds = e.engine
    assert ds.zero_optimization_stage() == 2
    assert (ds.train_micro_batch_size_per_gpu(), ds.gradient_accumulation_steps()) == (4, 3)
    assert ds.train_batch_size() == 4 * 3 * 1
    assert ds.bfloat16_enabled() and not ds.fp16_enabled()
    assert ds.gradient_clipping() == 0.5
    assert [g["weight_decay"] for g in ds.optimizer.param_groups] == [0.02, 0.0]
    assert {g["betas"] for g in ds.optimizer.param_groups} == {(0.9, 0.95)}

    f, lrs = lr_schedule(cfg), [e.lr]
    for i in range(6):
        loss, _ = e.micro_step(Tiny(), data(4, seed=i), last=i % 3 == 2)
        assert torch.isfinite(loss) and not loss.requires_grad
        lrs.append(e.lr)
    # the optimizer and the schedule step on every third micro-batch only
    assert lrs == pytest.approx([1e-2 * f(s) for s in (0, 0, 0, 1, 1, 1, 2)])
    model = e.full_model(Tiny(), rank=0)
    assert model is e.module and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert e.full_model(Tiny(), rank=1) is None


@pytest.mark.filterwarnings(
    "ignore:.*is deprecated:FutureWarning"
)  # DeepSpeed's ZeRO-3 collectives
def test_deepspeed_engine_zero3_full_model_is_a_plain_gathered_copy(gloo):
    from mmflow.train.engines import DeepSpeedEngine

    cfg = TrainConfig(strategy="deepspeed", zero_stage=3, batch_size=4, lr=1e-2, warmup_steps=0)
    e = DeepSpeedEngine(Tiny().build_model(), cfg, CPU, world=1)
    assert e.engine.zero_optimization_stage() == 3 and not e.engine.bfloat16_enabled()
    initial = Tiny().build_model().state_dict()
    first = e.full_model(Tiny(), rank=0)
    assert first is not e.module  # ZeRO-3 shards the module's weights; this is a built copy
    assert not any(hasattr(p, "ds_id") for p in first.parameters())
    assert all(torch.equal(v, initial[k]) for k, v in first.state_dict().items())
    e.micro_step(Tiny(), data(4), last=True)
    after = e.full_model(Tiny(), rank=0).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in after.items())  # it trained
    x, _ = data(4, seed=9)
    with torch.no_grad():  # the copy computes what the sharded engine computes
        assert torch.allclose(e.full_model(Tiny(), rank=0)(x), e.engine(x), atol=1e-6)
