"""The VQ-GAN: configs and registry, shapes, the l2-normalised quantizer and its dead-code
restarts, save/load, and the training module's one-backward GAN (each part gets its own
gradients), adaptive weight, perceptual networks and image metrics."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmflow.models.vqgan import (
    VQGAN,
    Preprocess,
    VQGANConfig,
    create_vqgan,
    from_uint8,
    list_archs,
    load_vqgan,
    save_vqgan,
    to_pil,
    vqgan_config,
)
from mmflow.models.vqgan_losses import (
    LPIPS,
    ClipPerceptual,
    VQGANLossConfig,
    VQGANTraining,
    adaptive_weight,
    hinge_d_loss,
)
from mmflow.stages.synth_shapes import SynthShapesParams, make_sample

TINY = VQGANConfig(
    image_size=16, channels=8, channel_mult=(1, 2), z_channels=16, codebook_size=32, codebook_dim=4
)


def images(n: int, size: int = 16) -> torch.Tensor:
    p, pre = SynthShapesParams(num_samples=n, image_size=size), Preprocess(size)
    return torch.stack([pre(Image.open(io.BytesIO(make_sample(0, i, p)[0]))) for i in range(n)])


def test_registry_has_the_named_architectures_and_validates_configs():
    assert {"vqgan-tiny-f4", "vqgan-f16-256"} <= set(list_archs())
    tiny, big = vqgan_config("vqgan-tiny-f4"), vqgan_config("vqgan-f16-256")
    assert (tiny.downsample_factor, tiny.grid_size) == (4, 8)
    assert (big.downsample_factor, big.grid_size, big.codebook_size) == (16, 16, 16384)
    assert vqgan_config("vqgan-tiny-f4", {"codebook_size": 1024}).codebook_size == 1024
    with pytest.raises(ValueError, match="unknown VQ-GAN architecture"):
        vqgan_config("vqgan-nope")
    with pytest.raises(ValueError, match="unknown VQ-GAN config keys"):
        vqgan_config("vqgan-tiny-f4", {"codebook_sise": 8})
    with pytest.raises(ValueError, match="multiples of 8"):
        VQGANConfig(channels=12)
    with pytest.raises(ValueError, match="not divisible"):
        VQGANConfig(image_size=30, channel_mult=(1, 2, 2))


def test_shapes_tokens_and_decoding_tokens_matches_the_forward_pass():
    torch.manual_seed(0)
    model, _ = create_vqgan(TINY)
    model.eval()
    x = images(3)
    with torch.no_grad():
        xrec, vq_loss, tokens, flat = model(x)
    assert xrec.shape == x.shape and tokens.shape == (3, 8, 8) and tokens.dtype == torch.int64
    assert flat.shape == (3 * 64, 4) and vq_loss.ndim == 0
    assert int(tokens.min()) >= 0 and int(tokens.max()) < TINY.codebook_size
    assert torch.allclose(model.decode_tokens(tokens), xrec, atol=1e-5)
    assert torch.equal(model.tokenize(x), tokens)


def test_lookup_is_the_largest_cosine_and_gradients_go_straight_through():
    torch.manual_seed(0)
    model = VQGAN(TINY)
    z = torch.randn(2, TINY.codebook_dim, 3, 3, requires_grad=True)
    zq, tokens, loss, _ = model.quantizer(z)
    flat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, TINY.codebook_dim), dim=1)
    codes = model.quantizer.codebook()
    assert torch.equal(tokens.flatten(), (flat @ codes.T).argmax(1))
    assert torch.allclose(
        zq.permute(0, 2, 3, 1).reshape(-1, TINY.codebook_dim), codes[tokens.flatten()], atol=1e-6
    )
    (zq.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through to the encoder
    assert model.quantizer.embedding.grad is not None  # the codebook loss reaches the codes


def test_first_restart_initialises_the_codebook_from_data_and_dead_codes_move():
    torch.manual_seed(0)
    model = VQGAN(TINY).train()
    q = model.quantizer
    z = torch.randn(4, TINY.codebook_dim, 4, 4)
    q(z, restart=True)  # usage is all zero: every code is dead
    assert q.restarted == TINY.codebook_size
    assert torch.allclose(q.codebook().norm(dim=1), torch.ones(TINY.codebook_size))
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, TINY.codebook_dim), dim=1)
    assert (q.codebook() @ flat.T).max(1).values.min() > 0.99  # each code sits on a data point
    for _ in range(300):  # only code 0's neighbourhood is ever seen: the rest die
        q(z[:1, :, :1, :1].expand(4, -1, 4, 4).contiguous())
    assert (q.usage < TINY.dead_threshold / TINY.codebook_size).sum() >= TINY.codebook_size - 2
    q(z, restart=True)
    assert q.restarted >= TINY.codebook_size - 2
    q.eval()
    usage = q.usage.clone()
    q(z, restart=True)  # eval: no tracking, no restarts
    assert torch.equal(q.usage, usage)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(TINY).eval()
    save_vqgan(model, str(tmp_path / "m"), "tiny-test", steps=3)
    again, preprocess, info = load_vqgan(str(tmp_path / "m"))
    assert info["arch"] == "tiny-test" and info["steps"] == 3 and preprocess.image_size == 16
    x = images(2)
    assert torch.equal(model.tokenize(x), again.tokenize(x))
    assert torch.allclose(
        model.decode_tokens(model.tokenize(x)), again.decode_tokens(again.tokenize(x))
    )


def test_preprocess_resizes_the_shorter_side_and_centre_crops():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    x = Preprocess(16)(wide)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))
    assert Preprocess(16).pixels(wide).dtype == torch.uint8
    assert to_pil(x).size == (16, 16) and to_pil(x).getpixel((3, 3)) == (255, 0, 0)
    assert torch.equal(
        from_uint8(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0])
    )


# --- the training module ----------------------------------------------------------------------------


def training(disc_start: int = 0, **loss) -> VQGANTraining:
    torch.manual_seed(0)
    cfg = VQGANLossConfig(
        disc_start=disc_start, disc_layers=1, disc_channels=8, restart_every=0, **loss
    )
    return VQGANTraining(VQGAN(TINY), cfg)


def test_one_backward_gives_the_discriminator_only_its_hinge_loss_gradient():
    m, x = training(disc_start=0), images(4)
    loss, metrics = m(x, step=5)
    loss.backward()
    assert {"pixel", "vq", "g_loss", "d_loss", "d_weight", "logits_real", "logits_fake"} <= set(
        metrics
    )
    disc = list(m.discriminator.parameters())
    got = [p.grad.clone() for p in disc]
    with torch.no_grad():
        xrec = m.vqgan(x)[0]
    real, fake = m.discriminator(torch.cat([x, xrec])).chunk(2)
    want = torch.autograd.grad(hinge_d_loss(real, fake), disc)
    for g, w in zip(got, want, strict=True):  # the generator's adversarial loss left D alone
        assert torch.allclose(g, w, atol=1e-6)


def test_the_generator_gets_reconstruction_codebook_and_weighted_adversarial_gradients():
    m, x = training(disc_start=0, disc_weight=0.5), images(4)
    enc = list(m.vqgan.parameters())
    loss, metrics = m(x, step=1)
    got = torch.autograd.grad(loss, enc, allow_unused=True)
    # the same loss written out by hand, the discriminator's hinge loss left out
    xrec, vq, _, _ = m.vqgan(x)
    nll = F.l1_loss(xrec, x)
    g_loss = -m.discriminator(xrec).mean()
    w = adaptive_weight(nll, g_loss, m.vqgan.decoder.last_layer)
    assert float(w) == pytest.approx(metrics["d_weight"], rel=1e-4)
    want = torch.autograd.grad(nll + vq + 0.5 * w * g_loss, enc, allow_unused=True)
    for g, h in zip(got, want, strict=True):
        assert (g is None and h is None) or torch.allclose(g, h, atol=1e-5)


def test_before_disc_start_the_discriminator_is_skipped_but_still_gets_zero_gradients():
    m = training(disc_start=10)
    loss, metrics = m(images(2), step=3)
    loss.backward()
    assert "g_loss" not in metrics
    assert all(p.grad is not None and not p.grad.any() for p in m.discriminator.parameters())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll, adv = (3 * w).sum(), (w**2).sum()  # grads (3, 3) and (2, 4)
    assert float(adaptive_weight(nll, adv, w)) == pytest.approx(
        math.sqrt(18) / (math.sqrt(20) + 1e-4)
    )


def test_clip_perceptual_and_lpips_from_local_files(tmp_path):
    import open_clip
    from torchvision.models.vgg import cfgs, make_layers

    from mmflow.models.clip import register_configs

    register_configs()
    torch.manual_seed(0)
    x, y = images(2), images(4)[2:]
    clip = ClipPerceptual(open_clip.create_model("mmflow-clip-tiny").visual)
    vgg = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, vgg)
    lins = tmp_path / "lpips_vgg.pth"
    torch.save(
        {
            f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
            for i, c in enumerate((64, 128, 256, 512, 512))
        },
        lins,
    )
    for net in (clip, LPIPS(str(vgg)), LPIPS(str(vgg), str(lins))):
        xg = x.clone().requires_grad_(True)
        assert float(net(x, x)) == pytest.approx(0.0, abs=1e-6)
        d = net(xg, y)
        d.backward()
        assert float(d.detach()) > 0 and xg.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="pixel loss"):
        VQGANLossConfig(pixel="l3")


def test_perceptual_network_is_outside_parameters_and_state_dict():
    import open_clip

    from mmflow.models.clip import register_configs

    register_configs()
    torch.manual_seed(0)
    net = ClipPerceptual(open_clip.create_model("mmflow-clip-tiny").visual)
    m = VQGANTraining(VQGAN(TINY), VQGANLossConfig(), net)
    assert not any(k.startswith("perceptual") for k in m.state_dict())
    assert sum(p.numel() for p in m.parameters()) == sum(
        p.numel() for p in [*m.vqgan.parameters(), *m.discriminator.parameters()]
    )


def test_local_encoder_codes_depend_only_on_their_own_patch():
    import torch

    from mmflow.models.vqgan import create_vqgan, vqgan_config

    torch.manual_seed(0)
    model, _ = create_vqgan(vqgan_config("vqgan-tiny-f4", {"local_encoder": True}))
    model.eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, 28:, 28:] = -x[:, :, 28:, 28:]  # change the bottom-right 4x4 patch only
    with torch.no_grad():
        zx, zy = model.encoder(x), model.encoder(y)
    changed = (zx - zy).abs().amax(1)[0] > 1e-6  # (8, 8) grid
    assert changed[7, 7] and changed.sum() == 1  # that patch's z moved, no other did
    # the convolutional encoder mixes the whole picture into every position
    conv, _ = create_vqgan(vqgan_config("vqgan-tiny-f4"))
    with torch.no_grad():
        assert ((conv.encoder(x) - conv.encoder(y)).abs().amax(1)[0] > 1e-6).sum() > 1
