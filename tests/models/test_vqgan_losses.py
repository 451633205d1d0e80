"""The VQ-GAN training losses beyond what tests/models/test_vqgan.py covers (gradient routing
between generator and discriminator, the adaptive weight's ratio, perceptual networks):
hinge loss values, the adaptive weight's clamp and side effects, the PatchGAN's patch grid and
per-sample independence, config checks, and VQGANTraining's schedule (disc_start, disc_weight
0, eval mode, restarts) and how its loss is put together from the parts it reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmflow.models.vqgan import VQGAN, VQGANConfig
from mmflow.models.vqgan_losses import (
    PatchDiscriminator,
    VQGANLossConfig,
    VQGANTraining,
    adaptive_weight,
    hinge_d_loss,
)

TINY = VQGANConfig(
    image_size=16, channels=8, channel_mult=(1, 2), z_channels=16, codebook_size=32, codebook_dim=4
)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def training(perceptual: nn.Module | None = None, **loss) -> VQGANTraining:
    torch.manual_seed(0)
    args = {"disc_start": 0, "disc_layers": 1, "disc_channels": 8, "restart_every": 0, **loss}
    return VQGANTraining(VQGAN(TINY), VQGANLossConfig(**args), perceptual)


# --- hinge loss and adaptive weight ---------------------------------------------------------------


def test_hinge_d_loss_values():
    t = torch.tensor
    # confident and right on both sides: beyond the margins, no loss
    assert float(hinge_d_loss(t([1.0, 3.0]), t([-1.0, -2.0]))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(1.0)
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))
    real, fake = t([2.0, 0.5]), t([-2.0, 0.5])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1.5) / 2))
    # the real and fake terms are means over their own patches, whatever their shapes
    r, f = torch.full((2, 1, 3, 3), -1.0), torch.full((2, 1, 5, 5), 0.0)
    assert float(hinge_d_loss(r, f)) == pytest.approx(0.5 * (2.0 + 1.0))


def test_hinge_d_loss_gradients_only_inside_the_margins():
    real = torch.tensor([0.0, 2.0], requires_grad=True)
    fake = torch.tensor([-3.0, 0.0], requires_grad=True)
    hinge_d_loss(real, fake).backward()
    assert real.grad.tolist() == [-0.25, 0.0] and fake.grad.tolist() == [0.0, 0.25]


def test_adaptive_weight_is_clamped_detached_and_fills_no_grad():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    nll = (1e3 * w).sum()
    flat = (0.0 * w).sum()  # an adversarial loss with no gradient at the layer
    weight = adaptive_weight(nll, flat, w)
    assert float(weight) == 1e4 and not weight.requires_grad  # clamped, not 1e3 * sqrt(2) / 1e-4
    assert w.grad is None  # torch.autograd.grad: no .grad, so no DDP hook fires
    assert float(adaptive_weight((0.0 * w).sum(), (w**2).sum(), w)) == 0.0
    # the graph is kept: the caller's backward through the same losses still works
    (nll + flat).backward()
    assert w.grad.tolist() == [1e3, 1e3]


# --- the PatchGAN discriminator -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "size", "grid"), [(1, 16, 6), (2, 32, 6), (3, 64, 6), (3, 32, 2)]
)
def test_patch_discriminator_gives_one_logit_per_patch(layers, size, grid):
    """Stride 2 in the first conv and all but the last of ``layers``; the last two 4x4 convs
    (stride 1, pad 1) take one off each: (H / 2**layers - 2) patches a side."""
    d = PatchDiscriminator(layers=layers, channels=8)
    out = d(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, grid, grid)
    assert grid == size // 2**layers - 2
    widths = [m.out_channels for m in d.net if isinstance(m, nn.Conv2d)]
    assert widths == [8, *[8 * min(2**n, 8) for n in range(1, layers + 1)], 1]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())


def test_patch_discriminator_scores_each_image_on_its_own():
    """Group norm: a picture's logits do not depend on what else is in the batch (real and
    fake halves of one call do not normalise each other)."""
    torch.manual_seed(0)
    d, x = PatchDiscriminator(layers=2, channels=8), images(4)
    alone = d(x[:1])
    together = d(torch.cat([x[:1], x[1:] * 5]))
    assert torch.allclose(alone, together[:1], atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"disc_weight": -0.1}, ">= 0"),
        ({"perceptual_weight": -1.0}, ">= 0"),
        ({"disc_start": -1}, ">= 0"),
        ({"restart_every": -5}, ">= 0"),
        ({"disc_layers": 0}, "disc_layers"),
        ({"disc_layers": 6}, "disc_layers"),
        ({"disc_channels": 4}, "disc_channels"),
    ],
)
def test_loss_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        VQGANLossConfig(**bad)


# --- VQGANTraining's schedule -----------------------------------------------------------------------


GAN_METRICS = {"g_loss", "d_loss", "d_weight", "logits_real", "logits_fake"}


def finite_grads(params) -> bool:
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_the_discriminator_starts_at_disc_start_exactly():
    m, x = training(disc_start=5), images()
    _, before = m(x, step=4)
    _, at = m(x, step=5)
    assert not GAN_METRICS & set(before) and set(at) >= GAN_METRICS


@pytest.mark.parametrize("step", [0, 3])
def test_loss_is_finite_and_reaches_every_parameter_before_and_after_disc_start(step):
    m = training(disc_start=2, disc_weight=0.5)
    loss, metrics = m(images(), step=step)
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    assert finite_grads(m.vqgan.parameters()) and finite_grads(m.discriminator.parameters())
    disc_moved = any(p.grad.any() for p in m.discriminator.parameters())
    assert disc_moved == (step >= 2)  # before disc_start its gradients are zeros, not None


def test_the_loss_is_the_sum_of_its_reported_parts():
    c = {"pixel_weight": 2.0, "codebook_weight": 0.5, "disc_weight": 0.3, "disc_start": 4}
    m, x = training(**c), images()
    loss, p = m(x, step=3)  # reconstruction and codebook only
    assert float(loss.detach()) == pytest.approx(2.0 * p["pixel"] + 0.5 * p["vq"], rel=1e-5)
    loss, p = m(x, step=4)  # + weighted adversarial loss for G, hinge loss for D
    want = 2.0 * p["pixel"] + 0.5 * p["vq"] + 0.3 * p["d_weight"] * p["g_loss"] + p["d_loss"]
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert p["d_weight"] > 0 and p["d_loss"] >= 0


def test_disc_weight_zero_never_runs_the_discriminator():
    m = training(disc_weight=0.0, disc_start=0)
    calls = []
    m.discriminator.register_forward_hook(lambda *a: calls.append(1))
    loss, metrics = m(images(), step=1000)
    loss.backward()
    assert calls == [] and not GAN_METRICS & set(metrics)
    assert all(not p.grad.any() for p in m.discriminator.parameters())


def test_eval_mode_and_adaptive_weight_off_use_weight_one():
    """Held-out loss runs without grad: no adaptive weight (it needs autograd), weight 1."""
    m, x = training(), images()
    m.eval()
    with torch.no_grad():
        loss, metrics = m(x, step=10)
    assert torch.isfinite(loss) and metrics["d_weight"] == 1.0
    fixed = training(adaptive_weight=False).train()
    _, metrics = fixed(x, step=10)
    assert metrics["d_weight"] == 1.0


def test_pixel_loss_l1_or_l2_and_perceptual_weighting():
    x = images()
    m1, m2 = training(pixel="l1", disc_weight=0.0), training(pixel="l2", disc_weight=0.0)
    _, p1 = m1(x, step=0)
    _, p2 = m2(x, step=0)
    with torch.no_grad():
        xrec = m1.vqgan(x)[0]  # both start from the same seed: the same reconstruction
    assert p1["pixel"] == pytest.approx(float(F.l1_loss(xrec, x)), rel=1e-5)
    assert p2["pixel"] == pytest.approx(float(F.mse_loss(xrec, x)), rel=1e-5)

    class Blur(nn.Module):  # a stand-in perceptual network with a buffer, like the real ones
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.full((3, 1, 3, 3), 1 / 9))
            self.calls = 0

        def forward(self, a, b):
            self.calls += 1
            return F.mse_loss(F.conv2d(a, self.k, groups=3), F.conv2d(b, self.k, groups=3))

    net = Blur()
    m = training(perceptual=net, perceptual_weight=0.7, disc_weight=0.0)
    loss, p = m(x, step=0)
    assert net.calls == 1 and p["perceptual"] > 0
    assert float(loss.detach()) == pytest.approx(
        p["pixel"] + 0.7 * p["perceptual"] + p["vq"], rel=1e-5
    )
    off = training(perceptual=net, perceptual_weight=0.0, disc_weight=0.0)
    _, p = off(x, step=0)
    assert net.calls == 1 and p["perceptual"] == 0.0  # weight 0: the network is not run


def test_restarts_follow_restart_every_and_restart_until():
    x = images()
    m = training(restart_every=5, disc_weight=0.0)
    _, first = m(x, step=0)  # the first restart initialises the codebook from the data
    assert first["restarted_codes"] == TINY.codebook_size
    _, off_period = m(x, step=3)
    assert "restarted_codes" not in off_period
    assert "restarted_codes" in m(x, step=10)[1]
    until = training(restart_every=5, restart_until=5, disc_weight=0.0)
    assert "restarted_codes" in until(x, step=5)[1]
    assert "restarted_codes" not in until(x, step=10)[1]
    never = training(restart_every=0, disc_weight=0.0)
    assert "restarted_codes" not in never(x, step=0)[1]


def test_batch_usage_is_the_share_of_codes_in_the_batch():
    m, x = training(disc_weight=0.0), images(8)
    _, metrics = m(x, step=0)
    with torch.no_grad():
        tokens = m.vqgan(x)[2]
    assert metrics["batch_usage"] == tokens.unique().numel() / TINY.codebook_size
    assert 0 < metrics["batch_usage"] <= 1
