"""LLaVA as transformers builds it: a CLIP vision tower, a projector and a Llama causal LM.

We build on transformers' ``LlavaForConditionalGeneration`` (and ``LlamaForCausalLM`` for the
language model) rather than on our own blocks, so that a trained model *is* the folder its
users load (``from_pretrained``), with nothing to convert at export. What this file adds:

- named LM architectures (``configs/llava/*.json``, Llama fields) behind :func:`lm_config`;
- the chat format: the special tokens and one Jinja chat template, stored with the tokenizer,
  and :func:`encode_conversation`, which lays out ids and labels exactly as the template and
  the Llava processor do (``<image>`` expanded to one token per patch feature), loss only on
  the assistant's turns;
- :class:`Pixels`, the vision tower's preprocessing in numpy (the tower itself, the pipeline's
  CLIP or a pretrained one, comes from :mod:`mmflow.models.llava_vision`);
- :func:`build_llava`, the freeze policies of the two LLaVA stages (:func:`set_trainable`),
  and :func:`processor_for` / :func:`save_llava`.

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs" / "llava"
IMAGE_TOKEN = "<image>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"  # reserved by mmflow's BPE (ids 0-2)
CHAT_TOKENS = (IMAGE_TOKEN, USER, ASSISTANT, END)
IGNORE = -100  # the label of a position without loss (transformers' convention)
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}

# What the processor renders; :func:`encode_conversation` is its twin in ids (a test holds
# them equal). Image items become "<image>\n", as in LLaVA's data.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# --- configs --------------------------------------------------------------------------------------


def lm_arch_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# LlamaConfig's architecture fields a named config or an override may set (checked without
# importing transformers, so that a pipeline validates in a second)
LLAMA_FIELDS = frozenset({
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "attention_dropout",
    "mlp_bias", "tie_word_embeddings", "initializer_range", "pretraining_tp",
})  # fmt: skip


def lm_fields(arch: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A named architecture's Llama fields with ``overrides`` applied; unknown names fail."""
    path = CONFIG_DIR / f"{arch}.json"
    if not path.is_file():
        raise ValueError(f"unknown LM architecture {arch!r}; known: {', '.join(lm_arch_names())}")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    unknown = (set(fields) | set(overrides or {})) - LLAMA_FIELDS
    if unknown:
        raise ValueError(f"LM architecture {arch!r}: unknown fields {sorted(unknown)}")
    return {**fields, **(overrides or {})}


def lm_config(arch: str, overrides: dict[str, Any] | None = None, vocab_size: int = 1024):
    """A ``LlamaConfig`` from a named architecture (:func:`lm_fields`)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, **lm_fields(arch, overrides))


@dataclass(frozen=True)
class VisionLayout:
    """How the vision tower's output becomes image tokens in the prompt."""

    feature_layer: int = -2  # hidden state read (LLaVA-1.5: the penultimate layer)
    select_strategy: str = "default"  # "default": class token dropped; "full": kept
    projector: str = "mlp2x_gelu"  # or "linear"

    def __post_init__(self) -> None:
        if self.select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be default or full, got {self.select_strategy!r}"
            )
        if self.projector not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector must be mlp2x_gelu or linear, got {self.projector!r}")

    @property
    def projector_act(self) -> str:
        # transformers' projector is always two linears; "linear" (identity) between them makes
        # their product one linear map, which is what LLaVA-1's linear projector computes
        return "gelu" if self.projector == "mlp2x_gelu" else "linear"

    def image_tokens(self, vision_config) -> int:
        """Image tokens per picture: one per patch (plus the class token with ``full``)."""
        side = vision_config.image_size // vision_config.patch_size
        return side * side + (1 if self.select_strategy == "full" else 0)


# --- tokenizer and chat format --------------------------------------------------------------------


def add_chat_tokens(tokenizer) -> None:
    """Give a ``tokenizers.Tokenizer`` the chat tokens and ``<image>`` as special tokens."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS]
    )


def hf_tokenizer(tokenizer):
    """The transformers tokenizer of a chat-ready ``tokenizers.Tokenizer``, chat template set."""
    from transformers import PreTrainedTokenizerFast

    missing = [t for t in (*CHAT_TOKENS, BOS, EOS, PAD) if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the tokenizer lacks the chat tokens {missing} (see add_chat_tokens)")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN}, chat_template=CHAT_TEMPLATE,
        padding_side="right", model_max_length=1 << 30,
    )  # fmt: skip


@dataclass(frozen=True)
class ChatIds:
    """The ids the chat format needs, read once from a tokenizer."""

    bos: int
    pad: int
    user: int
    assistant: int
    end: int
    image: int

    @classmethod
    def of(cls, tokenizer) -> ChatIds:
        """From a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
        get = getattr(tokenizer, "token_to_id", None) or tokenizer.convert_tokens_to_ids
        ids = {n: get(t) for n, t in (("bos", BOS), ("pad", PAD), ("user", USER),
                                        ("assistant", ASSISTANT), ("end", END), ("image", IMAGE_TOKEN))}  # fmt: skip
        if None in ids.values():
            raise ValueError(
                f"the tokenizer lacks chat tokens: {[k for k, v in ids.items() if v is None]}"
            )
        return cls(**ids)


def encode_conversation(
    turns: list[dict[str, str]],
    encode,
    ids: ChatIds,
    image_tokens: int,
    generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of LLaVA-format ``turns`` (``{"from": "human"|"gpt", "value": ...}``).

    ``encode(text) -> list[int]`` is the tokenizer without special tokens; ``<image>`` inside a
    turn becomes ``image_tokens`` image ids, as the Llava processor expands it. Labels are the
    ids of the assistant's contents and their ``<|end|>``, ``IGNORE`` elsewhere."""
    input_ids, labels = [ids.bos], [IGNORE]
    for turn in turns:
        role = ROLES.get(turn.get("from", ""))
        if role is None:
            raise ValueError(f"unknown turn author {turn.get('from')!r} (human or gpt)")
        body = []
        for i, piece in enumerate(turn["value"].split(IMAGE_TOKEN)):
            if i:
                body += [ids.image] * image_tokens
            body += encode(piece) if piece else []
        head = ids.user if role == "user" else ids.assistant
        input_ids += [head, *body, ids.end]
        answer = role == "assistant"
        labels += [
            IGNORE,
            *(body if answer else [IGNORE] * len(body)),
            ids.end if answer else IGNORE,
        ]
    if generation_prompt:
        input_ids.append(ids.assistant)
        labels.append(IGNORE)
    return input_ids, labels


class Pixels:
    """A picture (bytes or PIL) -> (3, S, S) float32: ``CLIPImageProcessor``'s steps (RGB,
    shortest side to S, centre crop, scale to [0, 1], normalise) in PIL and numpy, cheap
    enough for a data thread."""

    def __init__(self, size: int, mean, std, resample: int = 3):
        import numpy as np

        self.size, self.resample = int(size), int(resample)
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    @classmethod
    def of(cls, image_processor) -> Pixels:
        size = image_processor.crop_size["height"]
        return cls(
            size,
            image_processor.image_mean,
            image_processor.image_std,
            int(image_processor.resample),
        )

    def __call__(self, image):
        import io

        import numpy as np
        from PIL import Image

        img = Image.open(io.BytesIO(image)) if isinstance(image, bytes | bytearray) else image
        img = img.convert("RGB")
        s = self.size
        if img.size != (s, s):
            w, h = img.size
            # the shorter side to s, the longer truncated, as CLIPImageProcessor and torchvision do
            long = int(s * max(w, h) / min(w, h))
            img = img.resize((s, long) if w <= h else (long, s), self.resample)
            w, h = img.size
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
        x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


# --- the model ------------------------------------------------------------------------------------


def pad_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, T) tensors."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
            torch.tensor(x),
            torch.tensor(y),
            1,
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def next_token_loss(logits, labels, per_answer: bool = False):
    """(mean NLL over the labelled positions, their count): position t predicts label t+1.

    ``per_answer``: each answer (a run of labelled positions) weighs the same, its tokens
    sharing its weight, instead of each token weighing the same; a one-word answer ("circle")
    then counts as much as a twelve-token description."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    labelled = targets != IGNORE
    n = int(labelled.sum())
    if n == 0:
        return logits.sum() * 0.0, 0  # keeps the graph (DeepSpeed steps every rank together)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    if not per_answer:
        return nll.sum() / n, n
    before = torch.zeros_like(labelled)
    before[:, 1:] = labelled[:, :-1]
    span = torch.cumsum((labelled & ~before).reshape(-1).long(), 0)  # 1, 2, ... per answer run
    span = torch.where(labelled.reshape(-1), span, 0)
    length = torch.bincount(span).clamp(min=1)
    weight = labelled.reshape(-1).float() / length[span].float()
    return (nll * weight).sum() / (length.numel() - 1), n


def feature_layer_index(layer: int, vision_config) -> int:
    """``layer`` as the negative index of the tower's hidden states (0: the embeddings, then
    one per encoder layer), so ``0`` and ``-(layers + 1)`` mean the same. Llava's config is
    written with the negative index because transformers 5 drops the hidden states when the
    index is ``0`` (it passes the index on as ``output_hidden_states``, and 0 is false)."""
    n = int(vision_config.num_hidden_layers) + 1
    if not -n <= layer < n:
        raise ValueError(
            f"vision feature_layer {layer} is out of range: the tower has "
            f"{n - 1} layers, so its hidden states are {-n}..{n - 1}"
        )
    return layer - n if layer >= 0 else layer


def build_llava(vision_config, text_config, image_token_id: int, pad_id: int, layout: VisionLayout):
    """An untrained ``LlavaForConditionalGeneration``; load parts with :func:`load_parts`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    layer = feature_layer_index(layout.feature_layer, vision_config)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        projector_hidden_act=layout.projector_act, vision_feature_layer=layer,
        vision_feature_select_strategy=layout.select_strategy,
        image_seq_length=layout.image_tokens(vision_config), pad_token_id=pad_id,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )  # fmt: skip
    return LlavaForConditionalGeneration(config)


def load_parts(model, vision_state=None, lm_state=None, projector_state=None) -> None:
    """Weights into a Llava: the vision tower's (``CLIPVisionModel`` names), a
    ``LlamaForCausalLM``'s (``model.*``, ``lm_head.*``) and the projector's; strict, so a
    mismatch names the keys."""
    if vision_state is not None:
        model.model.vision_tower.load_state_dict(vision_state, strict=True)
    if lm_state is not None:
        body = {k[len("model.") :]: v for k, v in lm_state.items() if k.startswith("model.")}
        model.model.language_model.load_state_dict(body, strict=True)
        if "lm_head.weight" in lm_state and not model.config.tie_word_embeddings:
            model.lm_head.weight.data.copy_(lm_state["lm_head.weight"])
    if projector_state is not None:
        model.model.multi_modal_projector.load_state_dict(projector_state, strict=True)


def set_trainable(model, projector: bool = True, lm: bool = False, vision: bool = False) -> int:
    """The freeze policy: which parts train (stage 1: projector; stage 2: projector and LM).
    Returns the number of trainable parameters."""
    parts = {"multi_modal_projector": projector, "language_model": lm, "vision_tower": vision}
    for name, on in parts.items():
        for p in getattr(model.model, name).parameters():
            p.requires_grad_(on)
    for p in model.lm_head.parameters():  # tied to the embeddings when tie_word_embeddings
        p.requires_grad_(lm)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def processor_for(tokenizer, image_processor, vision_config, layout: VisionLayout):
    """The ``LlavaProcessor`` whose ``<image>`` expansion matches :func:`encode_conversation`."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=layout.select_strategy, chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token (dropped again by "default")
    )  # fmt: skip


def save_llava(model, processor, out_dir: str, **meta: Any) -> None:
    """The folder ``LlavaForConditionalGeneration.from_pretrained`` and
    ``AutoProcessor.from_pretrained`` load offline (safetensors), plus ``mmflow_llava.json``."""
    import os

    from mmflow.models.common.hf import save_pretrained

    save_pretrained(out_dir, model, processor)
    with open(os.path.join(out_dir, "mmflow_llava.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)
