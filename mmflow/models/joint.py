"""The joint-stream transformer: one decoder over text and image tokens (DALL-E, Chameleon).

One vocabulary (:class:`JointVocab`), laid out as

    [0, text_vocab)                        caption BPE ids, as the token table stores them
    [text_vocab, text_vocab + codebook)    image codes, offset after the text
    then <boi> <eoi> <bot> <eot> <pad> <t2i> <i2t>

and two sequence layouts of one fixed length, ``seq_len = r * max_text_len + image_tokens + 5``
with ``r = prompt_repeats``:

    text -> image:  <t2i> <bot> text (r times) <eot> <pad>...  <boi> image <eoi>
    image -> text:  <t2i> is replaced by <i2t>:  <i2t> <boi> image <eoi> <bot> text <eot> <pad>...

The prompt written ``r`` times is not a waste of context: the drawing has to find the words
that decide it (the object's colour, deep in the picture's raster) among every earlier
position, and with the prompt once a small model learns that lookup late. With it twice, the
copy is a target the text loss trains (a copying circuit that finds the earlier occurrence of
a word) and the words sit twice in the prefix; on the quickstart table a 0.9M model follows
the prompted colour after 500 steps that once did not after 1,000 (docs/joint.md).

The text->image padding sits between the caption and the image, as in DALL-E, so that every
picture starts at the same position: a batch of prompts of different lengths is sampled with
no attention mask, and the unconditional prefix of classifier-free guidance has the length of
the conditional one. Condition dropout (``drop_text``) replaces the caption by the empty one,
``<bot> <eot>``; a model trained with it for ~10% of samples predicts images without a
prompt, which guidance needs at sampling (``logits = uncond + s * (cond - uncond)``).

Every token after the first is a target except padding; its stream is image for codes, <boi>
and <eoi>, text otherwise, and the loss is the weighted sum of the two streams' mean NLLs
(DALL-E weighted the image 7/8), plus Chameleon's z-loss when ``z_loss > 0``.

    tokens (B, T) -> embedding (B, T, d) -> Decoder (models/common/transformer.py)
      -> lm head (B, T, V), tied to the embedding when ``tie_embeddings``

Architectures are JSON files in ``mmflow/models/configs/joint/*.json`` behind one factory,
:func:`create_joint`, which takes the vocabulary sizes from the token table at run time and
returns the model with its vocabulary (its preprocessing); :func:`save_joint` /
:func:`load_joint` write and read a model folder (safetensors and JSON, nothing pickled).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmflow.models.common.transformer import Decoder, KVCache, init_weights

# the configs are torch-free (a pipeline loads without torch); re-exported here
from mmflow.models.joint_config import (  # noqa: F401
    CONFIG_DIR,
    JointConfig,
    joint_config,
    list_archs,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = (
    "joint.json"  # {"arch", "config": JointConfig fields, "vocab": JointVocab fields, ...meta}
)
IGNORE = -100  # target id that carries no loss (F.cross_entropy's default ignore_index)
TEXT, IMAGE = 0, 1  # stream ids


# --- the vocabulary and the sequences -----------------------------------------------------------


@dataclass(frozen=True)
class JointSequence:
    """Sequences of the joint layout, each (L,) or (B, L): ids, which are targets, their streams."""

    tokens: torch.Tensor  # int64
    loss_mask: torch.Tensor  # bool: a target of the position before it
    stream: torch.Tensor  # int64: TEXT or IMAGE

    def inputs_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (..., L-1), targets (..., L-1)): next-token targets, IGNORE where masked."""
        targets = self.tokens[..., 1:].masked_fill(~self.loss_mask[..., 1:], IGNORE)
        return self.tokens[..., :-1], targets


@dataclass(frozen=True, kw_only=True)
class JointVocab:
    text_vocab: int  # the caption tokenizer's size
    codebook_size: int  # the VQ-GAN's codes
    image_tokens: int  # codes per picture, grid h * w, row-major
    max_text_len: int  # caption tokens a sequence has room for
    prompt_repeats: int = 1  # times a text->image prompt is written (1: models saved before it)

    SPECIALS: ClassVar[tuple[str, ...]] = ("boi", "eoi", "bot", "eot", "pad", "t2i", "i2t")

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1:
                raise ValueError(
                    f"JointVocab.{f.name} must be a positive integer, got {getattr(self, f.name)!r}"
                )

    def special(self, name: str) -> int:
        return self.text_vocab + self.codebook_size + self.SPECIALS.index(name)

    boi = property(lambda self: self.special("boi"))
    eoi = property(lambda self: self.special("eoi"))
    bot = property(lambda self: self.special("bot"))
    eot = property(lambda self: self.special("eot"))
    pad = property(lambda self: self.special("pad"))
    t2i = property(lambda self: self.special("t2i"))
    i2t = property(lambda self: self.special("i2t"))

    @property
    def size(self) -> int:
        return self.text_vocab + self.codebook_size + len(self.SPECIALS)

    @property
    def image_range(self) -> tuple[int, int]:
        return self.text_vocab, self.text_vocab + self.codebook_size

    @property
    def text_room(self) -> int:
        """Positions between <bot> and the picture or the end: room for the repeated prompt."""
        return self.max_text_len * self.prompt_repeats

    @property
    def seq_len(self) -> int:
        return self.text_room + self.image_tokens + 5

    def caption_mask(self) -> torch.Tensor:
        """(size,) bool: what a caption may contain, text ids and the <eot> that ends it."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[: self.text_vocab] = True
        mask[self.eot] = True
        return mask

    def stream_of(self, ids: torch.Tensor) -> torch.Tensor:
        """IMAGE for image codes, <boi> and <eoi>; TEXT for everything else (same shape)."""
        lo, hi = self.image_range
        image = ((ids >= lo) & (ids < hi)) | (ids == self.boi) | (ids == self.eoi)
        return image.long()

    def _text(self, text_ids: Sequence[int] | torch.Tensor) -> list[int]:
        ids = torch.as_tensor(text_ids, dtype=torch.long).flatten().tolist()
        if len(ids) > self.max_text_len:
            raise ValueError(
                f"caption of {len(ids)} tokens exceeds the model's max_text_len {self.max_text_len}"
            )
        if any(not 0 <= t < self.text_vocab for t in ids):
            raise ValueError(f"text ids must be in [0, {self.text_vocab})")
        return ids

    def _image(self, image_tokens: Sequence[int] | torch.Tensor) -> list[int]:
        codes = torch.as_tensor(image_tokens, dtype=torch.long).flatten().tolist()
        if len(codes) != self.image_tokens:
            raise ValueError(f"a picture has {self.image_tokens} codes, got {len(codes)}")
        if any(not 0 <= c < self.codebook_size for c in codes):
            raise ValueError(f"image codes must be in [0, {self.codebook_size})")
        return [self.text_vocab + c for c in codes]

    def _t2i_head(self, text_ids, drop_text: bool) -> list[int]:
        text = [] if drop_text else self._text(text_ids) * self.prompt_repeats
        pads = [self.pad] * (self.text_room - len(text))
        return [self.t2i, self.bot, *text, self.eot, *pads, self.boi]

    def t2i_prefix(self, text_ids: Sequence[int] = (), *, drop_text: bool = False) -> torch.Tensor:
        """(text_room + 4,): ``<t2i> <bot> text... <eot> <pad>... <boi>``, what an image follows
        (the text ``prompt_repeats`` times; the empty caption once, as training drops it)."""
        return torch.tensor(self._t2i_head(text_ids, drop_text))

    def i2t_prefix(self, image_tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(image_tokens + 4,): ``<i2t> <boi> image <eoi> <bot>``, what a caption follows."""
        return torch.tensor([self.i2t, self.boi, *self._image(image_tokens), self.eoi, self.bot])

    def text_to_image(self, text_ids, image_tokens, *, drop_text: bool = False) -> JointSequence:
        """The text->image training sequence; ``drop_text`` puts the empty caption in its place."""
        return self._sequence(
            [*self._t2i_head(text_ids, drop_text), *self._image(image_tokens), self.eoi]
        )

    def image_to_text(self, image_tokens, text_ids) -> JointSequence:
        text = self._text(text_ids)
        pads = [self.pad] * (self.text_room - len(text))
        return self._sequence([*self.i2t_prefix(image_tokens).tolist(), *text, self.eot, *pads])

    def _sequence(self, ids: list[int]) -> JointSequence:
        tokens = torch.tensor(ids)
        loss_mask = tokens != self.pad
        loss_mask[0] = False  # the task token is given, never predicted
        return JointSequence(tokens, loss_mask, self.stream_of(tokens))

    def batch(
        self,
        texts: Sequence[Sequence[int]],
        images: Sequence[Sequence[int]],
        *,
        i2t_share: float = 0.0,
        cond_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> JointSequence:
        """(B, seq_len) sequences of pairs: each image->text with probability ``i2t_share``, else
        text->image with its caption dropped with probability ``cond_dropout``.
        The direction of row b is ``tokens[b, 0]`` (``t2i`` or ``i2t``)."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} captions for {len(images)} pictures")
        i2t = torch.rand(len(texts), generator=generator) < i2t_share
        drop = torch.rand(len(texts), generator=generator) < cond_dropout
        seqs = [
            self.image_to_text(img, txt)
            if flip
            else self.text_to_image(txt, img, drop_text=bool(d))
            for txt, img, flip, d in zip(texts, images, i2t.tolist(), drop.tolist(), strict=True)
        ]
        return JointSequence(
            *(torch.stack([getattr(s, f) for s in seqs]) for f in ("tokens", "loss_mask", "stream"))
        )

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def layout(self) -> dict[str, Any]:
        """The ids, for a model folder's JSON and for readers in other languages."""
        ids = {name: self.special(name) for name in self.SPECIALS}
        return {
            "size": self.size,
            "image_range": list(self.image_range),
            "seq_len": self.seq_len,
            **ids,
        }


def check_fits(cfg: JointConfig, vocab: JointVocab, where: str = "", hint: str = "") -> None:
    """Raise if ``vocab``'s sequences are longer than ``cfg``'s context; ``where`` prefixes the
    message (a stage's name), ``hint`` ends it (what its caller can change)."""
    if vocab.seq_len > cfg.max_seq_len:
        raise ValueError(
            f"{where}sequences of {vocab.seq_len} tokens ({vocab.image_tokens} image + "
            f"prompt_repeats {vocab.prompt_repeats} x max_text_len {vocab.max_text_len} text + "
            f"5 special) exceed max_seq_len {cfg.max_seq_len}{hint}"
        )


# --- the model ----------------------------------------------------------------------------------


class JointTransformer(nn.Module):
    def __init__(self, cfg: JointConfig, vocab: JointVocab):
        super().__init__()
        check_fits(cfg, vocab)
        self.cfg, self.vocab = cfg, vocab
        self.tok_emb = nn.Embedding(vocab.size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = Decoder(cfg)
        self.head = nn.Linear(cfg.dim, vocab.size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        init_weights(self, cfg.n_layers)

    def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
        return self.decoder.init_cache(batch, max_len)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_weights: Mapping[str, float] | None = None,
        *,
        cache: list[KVCache] | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(logits (B, T, V) float32, losses or None). ``targets`` (B, T) are next-token ids, IGNORE
        where masked; ``cache``/``start_pos`` continue a sequence; ``last_only`` gives (B, 1, V)."""
        x = self.drop(self.tok_emb(tokens))  # (B, T, d)
        h = self.decoder(x, cache, start_pos)  # (B, T, d)
        if targets is None and last_only:
            h = h[:, -1:]
        logits = self.head(h).float()  # float32: log-softmax and z-loss are fragile in bf16
        if targets is None:
            return logits, None
        return logits, joint_losses(logits, targets, self.vocab, loss_weights, self.cfg.z_loss)


def joint_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab: JointVocab,
    loss_weights: Mapping[str, float] | None = None,
    z_loss: float = 0.0,
) -> dict[str, torch.Tensor]:
    """``loss`` = w_text * text_nll + w_image * image_nll (+ z_loss * mean lse**2), with
    ``text_nll``, ``image_nll`` the mean over each stream's targets (0 where a stream has none),
    so the mix does not depend on how many tokens each stream has in the batch."""
    weights = {"text": 1.0, "image": 1.0, **(loss_weights or {})}
    if set(weights) != {"text", "image"}:
        raise ValueError(
            f"loss_weights keys are 'text' and 'image', got {sorted(loss_weights or {})}"
        )
    valid = targets != IGNORE  # (B, T)
    lse = logits.logsumexp(-1)  # (B, T), shared by the NLL and the z-loss
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = (lse - picked) * valid
    image = (vocab.stream_of(targets) == IMAGE) & valid
    text = valid & ~image
    # masked sums, not boolean indexing: no data-dependent shapes, so torch.compile (the
    # `compile` train param) keeps the loss in the model's graph
    text_nll = (nll * text).sum() / text.sum().clamp(min=1)
    image_nll = (nll * image).sum() / image.sum().clamp(min=1)
    z = (lse.square() * valid).sum() / valid.sum().clamp(min=1)
    loss = weights["text"] * text_nll + weights["image"] * image_nll
    if z_loss > 0:
        loss = loss + z_loss * z
    return {
        "loss": loss,
        "text_nll": text_nll.detach(),
        "image_nll": image_nll.detach(),
        "z_loss": z.detach(),
    }


# --- registry, saving and loading ---------------------------------------------------------------


def create_joint(
    name_or_cfg: str | JointConfig,
    text_vocab: int,
    codebook_size: int,
    image_tokens: int,
    max_text_len: int | None = None,
    prompt_repeats: int = 1,
) -> tuple[JointTransformer, JointVocab]:
    """The model (random weights) and its vocabulary; the sizes come from the token table.
    ``max_text_len`` defaults to what the context leaves after the picture and 5 specials,
    shared by the ``prompt_repeats`` copies of a prompt."""
    cfg = joint_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    if max_text_len is None:
        max_text_len = (cfg.max_seq_len - image_tokens - 5) // max(1, prompt_repeats)
        if max_text_len < 1:
            raise ValueError(
                f"max_seq_len {cfg.max_seq_len} leaves no room for text after {image_tokens} image tokens"
            )
    vocab = JointVocab(
        text_vocab=text_vocab,
        codebook_size=codebook_size,
        image_tokens=image_tokens,
        max_text_len=max_text_len,
        prompt_repeats=prompt_repeats,
    )
    return JointTransformer(cfg, vocab), vocab


def save_joint(
    model: JointTransformer, folder: str, vocab: JointVocab, arch: str, **meta: Any
) -> None:
    """``model.safetensors`` (weights, the tied head stored once) and ``joint.json`` into a folder."""
    if vocab != model.vocab:
        raise ValueError(f"vocab {vocab} is not the model's {model.vocab}")
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del state["head.weight"]  # the same tensor as tok_emb.weight; safetensors refuses aliases
    save_file(state, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    info = {
        "format": "mmflow-joint",
        "arch": arch,
        "config": asdict(model.cfg),
        "vocab": vocab.to_dict(),
        "layout": vocab.layout(),
        **meta,
    }
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def load_joint(
    folder: str, device: str | torch.device = "cpu"
) -> tuple[JointTransformer, JointVocab, dict[str, Any]]:
    """(model in eval mode on ``device``, its vocabulary, the folder's ``joint.json``)."""
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        info = json.load(f)
    vocab = JointVocab(**info["vocab"])
    model = JointTransformer(JointConfig.from_dict(info["config"]), vocab)
    state = load_file(os.path.join(folder, WEIGHTS_FILE))  # tensors only: nothing is unpickled
    if model.cfg.tie_embeddings:
        state["head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state)
    return model.to(device).eval(), vocab, info
