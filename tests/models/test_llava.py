"""LLaVA on transformers' classes: the pipeline CLIP as a ``CLIPVisionModel`` (the same network,
layer by layer), ``Pixels`` against ``CLIPImageProcessor``, ``encode_conversation`` against the
Llava processor and its chat template, the loss without labels, the parts loaded into a Llava,
the freeze policies and the named LM configs.

The builders here (:func:`chat_tokenizer`, :func:`tiny_tower`, :func:`tiny_llava`) are the
tiny models tests/generate/test_llava.py trains."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmflow.data.text_tokenizer import TextTokenizer
from mmflow.models.llava import (
    ASSISTANT,
    END,
    IGNORE,
    IMAGE_TOKEN,
    ChatIds,
    Pixels,
    VisionLayout,
    add_chat_tokens,
    build_llava,
    encode_conversation,
    feature_layer_index,
    hf_tokenizer,
    lm_arch_names,
    lm_config,
    load_parts,
    next_token_loss,
    pad_batch,
    processor_for,
    set_trainable,
)
from mmflow.models.llava_vision import (
    PIXELS_FILE,
    clip_image_processor,
    open_clip_vision,
    pixels_of,
    prepare_vision_tower,
)
from mmflow.stages.synth_shapes import SynthShapesParams, draw_scene, make_sample, render

ARCH = "mmflow-clip-tiny"  # 32 px, 8 px patches: 16 image tokens (17 with the class token)
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


# --- builders (tests/generate/test_llava.py trains these) -----------------------------------------


def chat_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A ``tokenizers.Tokenizer`` as lm_train makes one: byte-level BPE plus the chat tokens."""
    tok = TextTokenizer.train(corpus, vocab_size).tokenizer
    add_chat_tokens(tok)
    return tok


def open_clip_tiny(seed: int = 0, quick_gelu: bool = False, jitter: float = 0.0):
    """(open_clip model, its model_cfg) of a random ``mmflow-clip-tiny``; ``jitter`` adds noise
    to every weight, so that ones and zeros (norms, biases) cannot hide a swapped tensor."""
    import open_clip

    from mmflow.models.clip import model_config

    cfg = dict(model_config(ARCH), **({"quick_gelu": True} if quick_gelu else {}))
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, force_quick_gelu=quick_gelu).eval()
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * jitter)
    return model, cfg


def tiny_tower(seed: int = 0):
    """(CLIPVisionModel, CLIPImageProcessor) of a random tiny open_clip ViT, converted."""
    from open_clip.model import get_model_preprocess_cfg
    from transformers import CLIPVisionModel

    model, cfg = open_clip_tiny(seed)
    config, state = open_clip_vision(model.visual, cfg)
    tower = CLIPVisionModel(config)
    tower.load_state_dict(state, strict=True)
    return tower.eval(), clip_image_processor(get_model_preprocess_cfg(model), config.image_size)


def tiny_llava(tok, tower, lm_overrides: dict | None = None, layout: VisionLayout | None = None):
    """(LlavaForConditionalGeneration, LlamaForCausalLM) from ``lm-tiny``: the LM random, the
    vision tower's weights loaded."""
    from transformers import LlamaForCausalLM

    ids = ChatIds.of(tok)
    cfg = lm_config("lm-tiny", lm_overrides, vocab_size=tok.get_vocab_size())
    cfg.bos_token_id, cfg.pad_token_id = ids.bos, ids.pad
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).eval()
    model = build_llava(tower.config, cfg, ids.image, ids.pad, layout or VisionLayout())
    load_parts(model, vision_state=tower.state_dict(), lm_state=lm.state_dict())
    return model.eval(), lm


CORPUS = [
    "What color is the circle?", "red", "How many shapes are there?", "two",
    "a red circle on a white background", "Describe the picture.", "Where is the blue square?",
    "top left", "Is there a green diamond in the picture?", "no", "yes",
] * 4  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def tower():
    return tiny_tower()


# --- the vision tower -----------------------------------------------------------------------------


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_vit_converts_to_the_same_clip_vision_model_layer_by_layer(quick_gelu):
    from transformers import CLIPVisionModel

    model, cfg = open_clip_tiny(seed=1, quick_gelu=quick_gelu, jitter=0.05)
    visual = model.visual
    config, state = open_clip_vision(visual, cfg)
    assert config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert (config.image_size, config.patch_size, config.num_hidden_layers) == (32, 8, 3)
    assert config.num_attention_heads == 128 // 32 and config.intermediate_size == 256
    tower = CLIPVisionModel(config).eval()
    tower.load_state_dict(state, strict=True)  # every name mapped, none left over

    blocks: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: blocks.append(o))
        for b in visual.transformer.resblocks
    ]
    pre: list[torch.Tensor] = []
    hooks.append(visual.ln_pre.register_forward_hook(lambda m, i, o: pre.append(o)))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = visual(x)  # (3, 64): ln_post(class token) @ proj
        got = tower(pixel_values=x, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert len(got.hidden_states) == 1 + len(blocks) == 4
    assert torch.allclose(got.hidden_states[0], pre[0], atol=1e-5)  # embeddings + ln_pre
    for i, (ours, theirs) in enumerate(zip(got.hidden_states[1:], blocks, strict=True)):
        assert ours.shape == theirs.shape == (3, 17, 128)
        assert torch.allclose(ours, theirs, atol=1e-5), f"block {i}: {(ours - theirs).abs().max()}"
    pooled = got.pooler_output @ visual.proj  # open_clip's projection is not CLIPVisionModel's
    assert torch.allclose(pooled, want, atol=1e-5), (pooled - want).abs().max()
    assert want.abs().max() > 0.1  # a real output, not two zeros agreeing


def test_prepare_vision_tower_from_a_clip_train_folder(tmp_path):
    from transformers import CLIPVisionModel

    from mmflow.models.clip import save_clip

    model, cfg = open_clip_tiny(seed=2, jitter=0.05)
    save_clip(model, ARCH, cfg, str(tmp_path / "clip"), source="test")
    settings = prepare_vision_tower(str(tmp_path / "tower"), clip_dir=str(tmp_path / "clip"))
    assert settings == {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                        "std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}  # fmt: skip
    assert (tmp_path / "tower" / PIXELS_FILE).exists()
    tower = CLIPVisionModel.from_pretrained(str(tmp_path / "tower")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            tower(pixel_values=x).pooler_output @ model.visual.proj, model.visual(x), atol=1e-5
        )
    with pytest.raises(ValueError, match="exactly one"):
        prepare_vision_tower(str(tmp_path / "t2"))
    with pytest.raises(ValueError, match="exactly one"):
        prepare_vision_tower(
            str(tmp_path / "t2"), clip_dir=str(tmp_path / "clip"), pretrained="x/y"
        )


def test_a_tower_clip_vision_model_cannot_hold_is_refused_not_converted_wrong():
    """open_clip's layer scale (``ls_init_value``, which clip_train's ``model_cfg`` accepts)
    has weights (``ls_1.gamma``, ``ls_2.gamma``) CLIPVisionModel has no place for: the
    conversion must refuse it, or give the same network."""
    import open_clip
    from transformers import CLIPVisionModel

    from mmflow.models.clip import model_config, register_config

    base = model_config(ARCH)
    cfg = {**base, "vision_cfg": {**base["vision_cfg"], "ls_init_value": 0.1}}
    register_config("test-llava-layer-scale", cfg)
    torch.manual_seed(0)
    visual = open_clip.create_model("test-llava-layer-scale").eval().visual
    assert any(k.endswith("ls_1.gamma") for k in visual.state_dict())
    try:
        config, state = open_clip_vision(visual, cfg)
    except ValueError:
        return  # refused, naming what it cannot convert
    tower = CLIPVisionModel(config).eval()
    tower.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = float((tower(pixel_values=x).pooler_output @ visual.proj - visual(x)).abs().max())
    assert err < 1e-5, f"converted to a different network (max abs difference {err:.3f})"


def test_only_plain_vit_towers_convert():
    model, cfg = open_clip_tiny()
    for bad in (
        {"timm_model_name": "resnet50"},
        {"layers": [3, 4, 6, 3]},
        {"attentional_pool": True},
    ):
        with pytest.raises(ValueError, match="plain ViT"):
            open_clip_vision(model.visual, {**cfg, "vision_cfg": {**cfg["vision_cfg"], **bad}})


# --- pixels ---------------------------------------------------------------------------------------


def _scene_picture(w: int, h: int) -> Image.Image:
    """A synth_shapes scene drawn at 128 px and resized to (w, h): real edges, not noise."""
    return render(draw_scene(np.random.default_rng(1), 2), 128).resize((w, h), Image.BICUBIC)


def test_pixels_equal_the_image_processor_on_a_32_px_picture(tower):
    _, processor = tower
    pixels = Pixels.of(processor)
    saved = Pixels(**pixels_of(processor))  # the settings a stage writes beside the tower
    assert (saved.size, saved.resample) == (pixels.size, pixels.resample) == (32, 3)
    assert np.array_equal(saved.mean, pixels.mean) and np.array_equal(saved.std, pixels.std)
    data, _ = make_sample(0, 5, SynthShapesParams(image_size=32))  # JPEG bytes, as in a shard
    want = processor(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
    for source in (data, Image.open(io.BytesIO(data))):
        got = pixels(source)
        assert got.shape == (3, 32, 32) and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-5
    grey = Image.open(io.BytesIO(data)).convert("L")  # converted to RGB like the processor
    want = processor(images=grey, return_tensors="np")["pixel_values"][0]
    assert np.abs(pixels(grey) - want).max() < 1e-5


@pytest.mark.parametrize(
    "size",
    [
        (50, 40),  # measured: 0.0150 max abs, one 8-bit level over std (PIL vs torchvision bicubic)
        (300, 200),  # the shorter side divides evenly: the same resize
        # The next two have a scaled long side whose fraction is >= .5 (640 * 32/480 = 42.67,
        # 47 * 32/33 = 45.58): Pixels rounds it up (43, 46), CLIPImageProcessor and open_clip
        # truncate it (42, 45), so the centre crop is shifted; measured 0.90 and 1.22 max abs.
        # These fail until Pixels truncates too (see the report of this test file's author).
        (640, 480),
        (47, 33),
    ],
)
def test_pixels_follow_the_image_processor_on_non_square_pictures(tower, size):
    _, processor = tower
    picture = _scene_picture(*size)
    got = Pixels.of(processor)(picture)
    want = processor(images=picture, return_tensors="np")["pixel_values"][0]
    assert got.shape == want.shape == (3, 32, 32)
    err = float(np.abs(got - want).max())
    assert err < 0.05, f"{size}: max abs difference {err:.3f}"


# --- the chat format ------------------------------------------------------------------------------

TURNS = [
    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "two shapes,  ünïcode too"},
    {"from": "human", "value": "Describe the picture."},
    {"from": "gpt", "value": "a red circle on a white background."},
]


def messages(turns):
    """LLaVA turns as transformers chat messages (the picture an image item)."""
    out = []
    for t in turns:
        role = "user" if t["from"] == "human" else "assistant"
        text = t["value"]
        items = [{"type": "image"}] if text.startswith(IMAGE_TOKEN + "\n") else []
        items.append({"type": "text", "text": text.removeprefix(IMAGE_TOKEN + "\n")})
        out.append({"role": role, "content": items})
    return out


def expected_labels(ids: list[int], chat: ChatIds) -> list[int]:
    """Labels worked out from the ids alone: every id after an ``<|assistant|>`` up to and
    including its ``<|end|>``."""
    labels, answering = [], False
    for i in ids:
        labels.append(i if answering else IGNORE)
        if i == chat.assistant:
            answering = True
        elif i == chat.end:
            answering = False
    return labels


def test_encode_conversation_lays_out_ids_as_the_llava_processor_does(tok, tower):
    vision, image_processor = tower
    layout = VisionLayout()
    processor = processor_for(hf_tokenizer(tok), image_processor, vision.config, layout)
    chat = ChatIds.of(tok)
    n = layout.image_tokens(vision.config)
    assert n == 16 and VisionLayout(select_strategy="full").image_tokens(vision.config) == 17
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    picture = Image.new("RGB", (32, 32), (200, 30, 30))

    ids, labels = encode_conversation(TURNS, encode, chat, n)
    text = processor.apply_chat_template(messages(TURNS))
    assert text.startswith("<|bos|><|user|><image>\nWhat color")
    want = processor(images=picture, text=text)["input_ids"][0]
    assert ids == list(want)
    assert ids.count(chat.image) == n and ids[0] == chat.bos

    assert len(labels) == len(ids)
    assert labels == expected_labels(ids, chat)
    answers = [t["value"] for t in TURNS if t["from"] == "gpt"]
    assert tok.decode([y for y in labels if y != IGNORE], skip_special_tokens=False) == "".join(
        f"{a}{END}" for a in answers
    )
    assert labels.count(chat.end) == 3 and chat.image not in labels and chat.assistant not in labels

    # the prompt a model answers: the last user turn, the assistant's turn opened, nothing labelled
    prompt, prompt_labels = encode_conversation(TURNS[:3], encode, chat, n, generation_prompt=True)
    text = processor.apply_chat_template(messages(TURNS[:3]), add_generation_prompt=True)
    assert text.endswith(f"<|end|>{ASSISTANT}")
    assert prompt == list(processor(images=picture, text=text)["input_ids"][0])
    assert prompt_labels[-1] == IGNORE and prompt[-1] == chat.assistant

    with pytest.raises(ValueError, match="unknown turn author 'system'"):
        encode_conversation([{"from": "system", "value": "hi"}], encode, chat, n)


def test_the_full_strategy_expands_the_class_token_too(tok, tower):
    vision, image_processor = tower
    layout = VisionLayout(select_strategy="full")
    processor = processor_for(hf_tokenizer(tok), image_processor, vision.config, layout)
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    ids, _ = encode_conversation(
        TURNS[:2], encode, ChatIds.of(tok), layout.image_tokens(vision.config)
    )
    text = processor.apply_chat_template(messages(TURNS[:2]))
    assert ids == list(processor(images=Image.new("RGB", (32, 32)), text=text)["input_ids"][0])
    assert ids.count(ChatIds.of(tok).image) == 17


def test_a_tokenizer_without_the_chat_tokens_is_refused():
    bare = TextTokenizer.train(CORPUS, 300).tokenizer
    with pytest.raises(ValueError, match="lacks the chat tokens"):
        hf_tokenizer(bare)
    with pytest.raises(ValueError, match="lacks chat tokens"):
        ChatIds.of(bare)


def test_layout_values_are_checked():
    with pytest.raises(ValueError, match="default or full"):
        VisionLayout(select_strategy="cls")
    with pytest.raises(ValueError, match="mlp2x_gelu or linear"):
        VisionLayout(projector="mlp3x")
    assert VisionLayout(projector="linear").projector_act == "linear"


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_every_feature_layer_reaches_the_projector_layer_0_included(tok, tower, layer):
    """Layer 0 (the patch embeddings) is written as its negative index: transformers 5 drops
    the hidden states for an index of 0 and the forward fails."""
    vision, _ = tower
    depth = vision.config.num_hidden_layers
    model, _ = tiny_llava(tok, vision, {"num_hidden_layers": 1}, VisionLayout(feature_layer=layer))
    assert model.config.vision_feature_layer == (layer - depth - 1 if layer >= 0 else layer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.model.multi_modal_projector(
            vision(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, 1:]
        )
        got = model.model.get_image_features(pixel_values=x).pooler_output
    assert torch.allclose(torch.cat(list(got)).reshape(want.shape), want, atol=1e-5)


def test_a_feature_layer_the_tower_lacks_is_named():
    class Config:
        num_hidden_layers = 3

    assert feature_layer_index(3, Config) == -1 and feature_layer_index(-4, Config) == -4
    for layer in (4, -5):
        with pytest.raises(ValueError, match=rf"feature_layer {layer} .* 3 layers.*-4\.\.3"):
            feature_layer_index(layer, Config)


# --- the loss -------------------------------------------------------------------------------------


def test_next_token_loss_is_transformers_loss_and_zero_without_labels(tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        lm_config("lm-tiny", {"num_hidden_layers": 1}, vocab_size=tok.get_vocab_size())
    )
    chat = ChatIds.of(tok)
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    text = [{**t, "value": t["value"].replace(IMAGE_TOKEN + "\n", "")} for t in TURNS]
    batch = pad_batch(
        [
            encode_conversation(text, encode, chat, 0),
            encode_conversation(text[:2], encode, chat, 0),
        ],
        chat.pad,
    )
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # one row padded
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE).all()

    out = lm(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    loss, n = next_token_loss(out.logits, batch["labels"])
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    assert torch.allclose(loss, out.loss, atol=1e-5)  # the same shift, the same mean

    none = torch.full_like(batch["labels"], IGNORE)
    out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=none)
    assert torch.isnan(out.loss)  # transformers' own loss: why next_token_loss counts instead
    loss, n = next_token_loss(out.logits, none)
    assert n == 0 and torch.isfinite(loss) and float(loss.detach()) == 0.0
    lm.zero_grad()
    loss.backward()  # the graph is kept: every rank can step together
    grads = [p.grad for p in lm.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)


# --- the model ------------------------------------------------------------------------------------


def test_load_parts_puts_the_lm_and_the_tower_inside_the_llava(tok, tower):
    vision, _ = tower
    model, lm = tiny_llava(tok, vision, {"num_hidden_layers": 1})
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    ids = torch.tensor([[ChatIds.of(tok).bos, *encode("What color is the circle?")]])
    with torch.no_grad():
        # text alone: the Llava is the LM (embeddings, body and the tied head)
        assert torch.allclose(model(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-5)
        x = torch.randn(1, 3, 32, 32)
        assert torch.allclose(
            model.model.vision_tower(pixel_values=x).pooler_output,
            vision(pixel_values=x).pooler_output,
            atol=1e-6,
        )
    bad = {f"x.{k}": v for k, v in vision.state_dict().items()}
    with pytest.raises(RuntimeError, match="Missing key"):
        load_parts(model, vision_state=bad)


def test_set_trainable_freezes_what_it_says(tok, tower):
    vision, _ = tower
    model, _ = tiny_llava(tok, vision, {"num_hidden_layers": 1})

    def trainable(part) -> set[bool]:
        return {p.requires_grad for p in part.parameters()}

    sizes = {name: sum(p.numel() for p in getattr(model.model, name).parameters())
             for name in ("multi_modal_projector", "language_model", "vision_tower")}  # fmt: skip
    # lm-tiny ties them: the head is the embeddings
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight

    n = set_trainable(model, projector=True)  # stage 1
    assert n == sizes["multi_modal_projector"]
    assert trainable(model.model.multi_modal_projector) == {True}
    assert trainable(model.model.language_model) == trainable(model.model.vision_tower) == {False}
    assert trainable(model.lm_head) == {False}

    n = set_trainable(model, projector=True, lm=True)  # stage 2
    assert n == sizes["multi_modal_projector"] + sizes["language_model"]
    assert trainable(model.model.language_model) == trainable(model.lm_head) == {True}
    assert trainable(model.model.vision_tower) == {False}

    n = set_trainable(model, projector=True, lm=True, vision=True)
    assert n == sum(p.numel() for p in model.parameters()) == sum(sizes.values())
    assert set_trainable(model, projector=False) == 0


def test_lm_config_names_architectures_and_rejects_unknown_ones():
    assert lm_arch_names() == ["lm-160m", "lm-1b", "lm-tiny"]
    cfg = lm_config("lm-tiny", {"num_hidden_layers": 1, "hidden_size": 64}, vocab_size=500)
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size) == (500, 1, 64)
    assert cfg.intermediate_size == 344  # from the file
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 256
    assert not hasattr(cfg, "_doc")  # the file's comment is not a field
    known = r"unknown LM architecture 'lm-huge'; known: lm-160m, lm-1b, lm-tiny"
    with pytest.raises(ValueError, match=known):
        lm_config("lm-huge")
    with pytest.raises(ValueError, match=r"'lm-tiny': unknown fields \['hiden_size'\]"):
        lm_config("lm-tiny", {"hiden_size": 64})


def test_next_token_loss_per_answer_weighs_each_answer_once():
    """With ``per_answer`` every run of labelled positions (an answer) weighs the same, its
    tokens sharing that weight: the mean over answers of each answer's mean NLL, so a short
    answer counts as much as a long one. Runs are split at row ends too."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 5)
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE, 3, IGNORE, IGNORE],
                           [IGNORE, IGNORE, 0, 4, 4, 4, 2]])  # fmt: skip
    labels_next_row = torch.tensor([[IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 1],
                                    [IGNORE, 2, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]])  # fmt: skip

    def nll(lab, row, t):
        return float(F.cross_entropy(logits[row, t - 1][None], lab[row, t][None]))

    for lab, answers in (
        (labels, [[(0, 1), (0, 2)], [(0, 4)], [(1, 2), (1, 3), (1, 4), (1, 5), (1, 6)]]),
        (labels_next_row, [[(0, 6)], [(1, 1)]]),  # a row's last answer and the next row's first
    ):
        per_token, n = next_token_loss(logits, lab)
        per_answer, n2 = next_token_loss(logits, lab, per_answer=True)
        tokens = [nll(lab, *p) for a in answers for p in a]
        assert n == n2 == len(tokens)
        assert float(per_token) == pytest.approx(sum(tokens) / len(tokens), rel=1e-5)
        means = [sum(nll(lab, *p) for p in a) / len(a) for a in answers]
        assert float(per_answer) == pytest.approx(sum(means) / len(means), rel=1e-5)
    none = torch.full_like(labels, IGNORE)
    loss, n = next_token_loss(logits, none, per_answer=True)
    assert n == 0 and float(loss) == 0.0
