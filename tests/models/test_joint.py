"""The joint-stream transformer: vocabulary layout, the two sequence layouts with their masks and
streams, condition dropout, per-stream losses and z-loss, the KV-cache path, overfitting a few
sequences, save/load, config errors and the architecture registry."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from mmflow.models.joint import (
    IGNORE,
    IMAGE,
    TEXT,
    JointConfig,
    JointTransformer,
    JointVocab,
    create_joint,
    joint_config,
    list_archs,
    load_joint,
    save_joint,
)

VOCAB = JointVocab(text_vocab=10, codebook_size=8, image_tokens=4, max_text_len=4)
CFG = JointConfig(dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=16, z_loss=1e-4)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


def _model(cfg: JointConfig = CFG) -> JointTransformer:
    torch.manual_seed(0)
    return JointTransformer(cfg, VOCAB)


def test_vocabulary_layout():
    v = VOCAB
    assert v.image_range == (10, 18)
    specials = [v.boi, v.eoi, v.bot, v.eot, v.pad, v.t2i, v.i2t]
    assert specials == list(range(18, 25)) and v.size == 25
    assert v.seq_len == 4 + 4 + 5
    assert v.stream_of(torch.tensor([0, 9, 10, 17, v.boi, v.eoi, v.bot, v.eot])).tolist() == [
        TEXT, TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT, TEXT,
    ]  # fmt: skip
    mask = v.caption_mask()
    assert mask[:10].all() and mask[v.eot] and mask.sum() == 11
    assert v.layout()["eot"] == v.eot and JointVocab(**v.to_dict()) == v


def test_text_to_image_layout_mask_and_streams():
    v = VOCAB
    s = v.text_to_image([3, 4], [0, 1, 2, 7])
    assert s.tokens.tolist() == [
        v.t2i,
        v.bot,
        3,
        4,
        v.eot,
        v.pad,
        v.pad,
        v.boi,
        10,
        11,
        12,
        17,
        v.eoi,
    ]
    assert s.loss_mask.tolist() == [False, True, True, True, True, False, False] + [True] * 6
    assert s.stream.tolist() == [TEXT] * 7 + [IMAGE] * 6
    # the picture starts at the same place whatever the caption's length
    assert (
        v.text_to_image([1, 2, 3, 4], torch.tensor([0, 1, 2, 7])).tokens[7:].tolist()
        == s.tokens[7:].tolist()
    )
    inputs, targets = s.inputs_targets()
    assert inputs.tolist() == s.tokens[:-1].tolist()
    assert targets.tolist() == [v.bot, 3, 4, v.eot, IGNORE, IGNORE, v.boi, 10, 11, 12, 17, v.eoi]


def test_image_to_text_layout_and_prefixes():
    v = VOCAB
    s = v.image_to_text(torch.tensor([[0, 1], [2, 3]]), [5])  # a (2, 2) grid, row-major
    assert s.tokens.tolist() == [
        v.i2t,
        v.boi,
        10,
        11,
        12,
        13,
        v.eoi,
        v.bot,
        5,
        v.eot,
        v.pad,
        v.pad,
        v.pad,
    ]
    assert s.loss_mask.tolist() == [False] + [True] * 9 + [False] * 3
    assert s.stream.tolist() == [TEXT] + [IMAGE] * 6 + [TEXT] * 6
    assert v.i2t_prefix([0, 1, 2, 3]).tolist() == s.tokens[:8].tolist()
    assert v.t2i_prefix([3]).tolist() == v.text_to_image([3], [0] * 4).tokens[:8].tolist()


def test_repeated_prompt_layout():
    """prompt_repeats=2: the caption twice before the picture, the picture at one fixed place,
    both copies text targets; the empty caption (guidance) and image->text rows written once."""
    v = JointVocab(**{**VOCAB.to_dict(), "prompt_repeats": 2})
    assert v.text_room == 8 and v.seq_len == 8 + 4 + 5
    s = v.text_to_image([3, 4], [0, 1, 2, 7])
    pads = [v.pad] * 4  # room for two copies of the longest caption
    picture = [v.boi, 10, 11, 12, 17, v.eoi]
    assert s.tokens.tolist() == [v.t2i, v.bot, 3, 4, 3, 4, v.eot, *pads, *picture]
    assert s.loss_mask.tolist() == [False] + [True] * 6 + [False] * 4 + [True] * 6
    longest = v.text_to_image([1, 2, 3, 4], [0, 1, 2, 7]).tokens
    assert (
        longest[2:10].tolist() == [1, 2, 3, 4] * 2
        and longest[11:].tolist() == s.tokens[11:].tolist()
    )
    assert v.t2i_prefix([3, 4]).tolist() == s.tokens[:12].tolist()
    assert v.t2i_prefix(drop_text=True).tolist() == [v.t2i, v.bot, v.eot, *[v.pad] * 8, v.boi]
    i2t = v.image_to_text([0, 1, 2, 3], [5])
    assert (
        i2t.tokens.tolist()[7:] == [v.bot, 5, v.eot, *[v.pad] * 7] and len(i2t.tokens) == v.seq_len
    )
    with pytest.raises(ValueError, match="max_text_len 4"):
        v.text_to_image([1] * 5, [0] * 4)  # the limit is one copy's
    # a model folder saved before prompt_repeats existed loads as writing the prompt once
    old = {k: x for k, x in VOCAB.to_dict().items() if k != "prompt_repeats"}
    assert JointVocab(**old).prompt_repeats == 1 and JointVocab(**old) == VOCAB
    with pytest.raises(ValueError, match="prompt_repeats must be a positive integer"):
        JointVocab(**{**old, "prompt_repeats": 0})
    with pytest.raises(
        ValueError, match="prompt_repeats 2 x max_text_len 6 text"
    ):  # 12 + 4 + 5 > max_seq_len 16
        JointTransformer(CFG, JointVocab(**{**old, "max_text_len": 6, "prompt_repeats": 2}))


def test_condition_dropout_is_the_empty_caption():
    v = VOCAB
    s = v.text_to_image([3, 4], [0, 1, 2, 3], drop_text=True)
    assert s.tokens[:3].tolist() == [v.t2i, v.bot, v.eot]
    assert v.t2i_prefix(drop_text=True).tolist() == s.tokens[:8].tolist()

    texts, images = [[1, 2]] * 64, [[0, 1, 2, 3]] * 64
    dropped = v.batch(texts, images, cond_dropout=1.0).tokens
    assert (dropped[:, 2] == v.eot).all() and (dropped[:, 0] == v.t2i).all()
    assert (v.batch(texts, images, i2t_share=1.0).tokens[:, 0] == v.i2t).all()
    g = torch.Generator().manual_seed(1)
    mixed = v.batch(texts, images, i2t_share=0.5, cond_dropout=0.5, generator=g)
    assert mixed.tokens.shape == (64, v.seq_len) and mixed.loss_mask.shape == (64, v.seq_len)
    i2t = mixed.tokens[:, 0] == v.i2t
    no_text = (mixed.tokens[:, 2] == v.eot) & ~i2t
    assert 10 < i2t.sum() < 54 and 0 < no_text.sum() < (~i2t).sum()  # both happen, not always
    again = v.batch(
        texts, images, i2t_share=0.5, cond_dropout=0.5, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(again.tokens, mixed.tokens)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: VOCAB.text_to_image([1] * 5, [0] * 4),
            "caption of 5 tokens exceeds the model's max_text_len 4",
        ),
        (lambda: VOCAB.text_to_image([10], [0] * 4), r"text ids must be in \[0, 10\)"),
        (lambda: VOCAB.text_to_image([1], [0] * 3), "a picture has 4 codes, got 3"),
        (lambda: VOCAB.image_to_text([8, 0, 0, 0], [1]), r"image codes must be in \[0, 8\)"),
        (
            lambda: JointVocab(text_vocab=0, codebook_size=8, image_tokens=4, max_text_len=4),
            "text_vocab",
        ),
        (lambda: JointConfig(dim=30, n_heads=4), "dim 30 is not divisible by n_heads 4"),
        (lambda: JointConfig(z_loss=-1.0), "z_loss must be >= 0"),
        (lambda: JointConfig.from_dict({"dims": 8}), r"unknown JointConfig keys \['dims'\]"),
        (lambda: joint_config("joint-huge"), "unknown joint architecture 'joint-huge'"),
        (lambda: JointTransformer(JointConfig(max_seq_len=12), VOCAB), "sequences of 13 tokens"),
        (lambda: create_joint("joint-tiny", 10, 8, 124), "leaves no room for text"),
    ],
)
def test_errors_are_clear(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_per_stream_losses_and_z_loss():
    model = _model()
    seqs = VOCAB.batch(
        [[1, 2], [3]],
        [[0, 1, 2, 3], [4, 5, 6, 7]],
        i2t_share=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    inputs, targets = seqs.inputs_targets()
    logits, losses = model(inputs, targets)
    assert logits.shape == (2, VOCAB.seq_len - 1, VOCAB.size) and logits.dtype == torch.float32
    assert all(torch.isfinite(v) for v in losses.values())
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T), 0 at IGNORE
    image = (VOCAB.stream_of(targets) == IMAGE) & (targets != IGNORE)
    text = (targets != IGNORE) & ~image
    torch.testing.assert_close(losses["text_nll"], nll[text].mean())
    torch.testing.assert_close(losses["image_nll"], nll[image].mean())
    z = logits.logsumexp(-1)[targets != IGNORE].square().mean()
    torch.testing.assert_close(losses["z_loss"], z)
    torch.testing.assert_close(losses["loss"], nll[text].mean() + nll[image].mean() + 1e-4 * z)
    _, weighted = model(inputs, targets, {"text": 0.125, "image": 0.875})
    torch.testing.assert_close(
        weighted["loss"], 0.125 * nll[text].mean() + 0.875 * nll[image].mean() + 1e-4 * z
    )
    with pytest.raises(ValueError, match="loss_weights keys"):
        model(inputs, targets, {"picture": 1.0})
    image_only = targets.masked_fill(~image, IGNORE)  # a stream with no targets counts 0, not NaN
    assert model(inputs, image_only)[1]["text_nll"] == 0


def test_kv_cache_path_gives_the_full_forwards_logits():
    model = _model().eval()
    tokens = VOCAB.batch([[1, 2], [3]], [[0, 1, 2, 3], [4, 5, 6, 7]]).tokens
    full, _ = model(tokens)
    cache = model.init_cache(2, VOCAB.seq_len)
    steps = [model(tokens[:, :6], cache=cache)[0]]
    steps += [
        model(tokens[:, t : t + 1], cache=cache, start_pos=t)[0] for t in range(6, VOCAB.seq_len)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    last, _ = model(tokens, last_only=True)
    torch.testing.assert_close(last, full[:, -1:])


def test_tiny_model_overfits_a_few_sequences():
    torch.manual_seed(0)
    model = JointTransformer(CFG, VOCAB)
    texts = [[1, 2], [3], [4, 5, 6], [7]]
    images = [torch.randint(0, 8, (4,)).tolist() for _ in texts]
    inputs, targets = VOCAB.batch(
        texts, images, i2t_share=0.5, generator=torch.Generator().manual_seed(0)
    ).inputs_targets()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    for step in range(200):
        _, losses = model(inputs, targets)
        if step == 0:
            first = losses["loss"].item()
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
    assert losses["loss"].item() < first / 20, (first, losses)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trips_exactly(tmp_path, tie):
    cfg = JointConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    model = _model(cfg)
    assert (model.head.weight is model.tok_emb.weight) == tie
    save_joint(model, str(tmp_path), VOCAB, "micro", step=7)
    info = json.loads((tmp_path / "joint.json").read_text())
    assert info["arch"] == "micro" and info["step"] == 7 and info["layout"]["eot"] == VOCAB.eot
    assert (tmp_path / "model.safetensors").read_bytes()[8:9] == b"{"  # a safetensors JSON header
    loaded, vocab, _ = load_joint(str(tmp_path))
    assert vocab == VOCAB and loaded.cfg == cfg and not loaded.training
    assert (loaded.head.weight is loaded.tok_emb.weight) == tie
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    tokens = VOCAB.batch([[1]], [[0, 1, 2, 3]]).tokens
    assert torch.equal(model.eval()(tokens)[0], loaded(tokens)[0])
    other = JointVocab(**{**VOCAB.to_dict(), "max_text_len": 3})
    with pytest.raises(ValueError, match="is not the model's"):
        save_joint(model, str(tmp_path), other, "micro")


def test_registry_configs_build_at_their_sizes():
    assert {"joint-tiny", "joint-small", "joint-100m", "joint-1b"} <= set(list_archs())
    for arch, lo, hi in [("joint-tiny", 0.9e6, 1.1e6), ("joint-small", 3e6, 4e6)]:
        tiny, vocab = create_joint(
            arch, text_vocab=1024, codebook_size=512, image_tokens=64, max_text_len=32
        )
        n = sum(p.numel() for p in tiny.parameters())
        assert n == tiny.cfg.num_params(vocab.size) and lo < n < hi, (arch, n)
    assert (
        vocab.seq_len == 101
        and create_joint("joint-tiny", 1024, 512, 64)[1].max_text_len == 128 - 69
    )
    for arch, lo, hi in [("joint-100m", 90e6, 130e6), ("joint-1b", 0.9e9, 1.2e9)]:
        with torch.device("meta"):  # shapes only: 1B parameters are never allocated
            model, vocab = create_joint(
                arch, text_vocab=8192, codebook_size=16384, image_tokens=256, max_text_len=64
            )
        n = sum(p.numel() for p in model.parameters())
        assert n == model.cfg.num_params(vocab.size) and lo < n < hi, (arch, n)
