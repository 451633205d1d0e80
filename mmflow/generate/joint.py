"""Pictures from captions and captions from pictures with a trained joint-stream model.

A :class:`Painter` holds what both directions need: the transformer and its vocabulary,
the caption tokenizer the token table was made with, and the VQ-GAN that turns image codes
into pixels and pixels into codes. The training stage's evaluation, ``mmflow generate`` and
users' scripts all draw through it, so what is measured is what users get.

A joint model folder (``joint_train``'s output) holds ``model.safetensors`` and
``joint.json`` (:mod:`mmflow.models.joint`), the caption tokenizer (``tokenizer.json``), and
in ``joint.json`` the VQ-GAN's location and the caption ids seen in training: a prompt that
needs ids the model never saw in training (words of another vocabulary) is refused by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from mmflow.data.text_tokenizer import TextTokenizer
from mmflow.generate.sampling import SamplingConfig, generate_caption_ids, generate_image_tokens
from mmflow.models.joint import CONFIG_FILE, JointTransformer, JointVocab, load_joint
from mmflow.models.vqgan import VQGAN, Preprocess, from_uint8, to_unit

TOKENIZER_FILE = "tokenizer.json"


class PromptError(ValueError):
    """A prompt the model cannot take (too long, or words it never saw)."""


@dataclass
class Painter:
    model: JointTransformer
    vocab: JointVocab
    tokenizer: TextTokenizer
    vqgan: VQGAN
    seen_text_ids: frozenset[int] | None = None  # None: accept any text id
    batch_size: int = 64
    sampling: dict[str, Any] = field(default_factory=dict)  # the stage's settings, as saved
    grid: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        side = int(round(self.vocab.image_tokens**0.5))
        if side * side != self.vocab.image_tokens:
            raise ValueError(f"{self.vocab.image_tokens} image tokens are not a square grid")
        self.grid = (side, side)

    def sampling_for(
        self,
        *,
        drawing: bool,
        temperature: float | None = None,
        guidance_scale: float | None = None,
        **rest: Any,
    ) -> SamplingConfig:
        """Settings for drawing (``drawing``) or captioning: what is not given comes from the
        stage's own (saved with the model) for pictures; captions are greedy and unguided."""
        if not drawing:
            return SamplingConfig(temperature=temperature or 0.0, guidance_scale=1.0, **rest)
        saved = self.sampling
        return SamplingConfig(
            temperature=saved.get("temperature", 1.0) if temperature is None else temperature,
            guidance_scale=saved.get("guidance_scale", 1.5) if guidance_scale is None else guidance_scale,
            **rest,
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- text -> image ---------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Caption ids of each prompt; a :class:`PromptError` names the first that cannot go."""
        out = []
        for prompt, ids in zip(prompts, self.tokenizer.encode_batch(prompts), strict=True):
            if len(ids) > self.vocab.max_text_len:
                raise PromptError(
                    f"prompt {prompt!r} is {len(ids)} tokens; this model takes at most "
                    f"{self.vocab.max_text_len} (its max_text_len)"
                )
            if self.seen_text_ids is not None and any(i not in self.seen_text_ids for i in ids):
                unknown = sorted({w for w in prompt.split() if not self._known(w)}, key=prompt.find)
                raise PromptError(
                    f"prompt {prompt!r}: {', '.join(map(repr, unknown)) or 'some characters'} "
                    "never appeared in this model's training captions, so it cannot draw them"
                )
            out.append(ids)
        return out

    def _known(self, word: str) -> bool:
        """Seen in training at the start of a caption or after a space."""
        seen = self.seen_text_ids or frozenset()
        forms = self.tokenizer.encode_batch([word, " " + word])
        return any(all(i in seen for i in ids) for ids in forms)

    @torch.no_grad()
    def draw_ids(self, text_ids: list[list[int]], sampling: SamplingConfig) -> torch.Tensor:
        """uint8 (B, 3, H, W) pictures, one per caption, in batches of ``batch_size``."""
        pictures = []
        for start in range(0, len(text_ids), self.batch_size):
            chunk = text_ids[start : start + self.batch_size]
            cfg = sampling if start == 0 else _reseeded(sampling, start)
            codes = generate_image_tokens(self.model, self.vocab, chunk, cfg)  # (b, h*w)
            pictures.append(self.decode_codes(codes))
        return torch.cat(pictures) if pictures else torch.empty(0, 3, 0, 0, dtype=torch.uint8)

    def draw(self, prompts: list[str], sampling: SamplingConfig) -> torch.Tensor:
        return self.draw_ids(self.encode_prompts(prompts), sampling)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h*w) codes in [0, codebook) -> uint8 (B, 3, H, W)."""
        grid = codes.reshape(len(codes), *self.grid).to(next(self.vqgan.parameters()).device)
        images = self.vqgan.decode_tokens(grid.long())
        return (to_unit(images) * 255).round().byte().cpu()

    # --- image -> text ---------------------------------------------------------------------
    @torch.no_grad()
    def caption_codes(self, codes: torch.Tensor, sampling: SamplingConfig) -> list[str]:
        """A caption per picture's codes (B, h*w)."""
        out: list[str] = []
        for start in range(0, len(codes), self.batch_size):
            chunk = codes[start : start + self.batch_size]
            ids = generate_caption_ids(self.model, self.vocab, chunk, sampling)
            out += [self.tokenizer.decode(i).strip() for i in ids]
        return out

    @torch.no_grad()
    def encode_images(self, images: list[Any]) -> torch.Tensor:
        """PIL images -> (B, h*w) codes through the VQ-GAN's own preprocessing."""
        pre = Preprocess(self.vqgan.cfg.image_size)
        x = from_uint8(torch.stack([pre.pixels(img) for img in images]))
        tokens = self.vqgan.tokenize(x.to(next(self.vqgan.parameters()).device))  # (B, h, w)
        return tokens.reshape(len(images), -1).cpu()

    def caption(self, images: list[Any], sampling: SamplingConfig) -> list[str]:
        return self.caption_codes(self.encode_images(images), sampling)


def _reseeded(cfg: SamplingConfig, offset: int) -> SamplingConfig:
    """Each batch its own seed, so batch 2 does not repeat batch 1's draws."""
    from dataclasses import replace

    return replace(cfg, seed=cfg.seed + offset)


def save_extras(folder: str, tokenizer_json: str, **meta: Any) -> None:
    """The caption tokenizer and facts for drawing (VQ-GAN location, seen ids) beside the
    weights: ``joint.json`` gains ``meta``."""
    with open(os.path.join(folder, TOKENIZER_FILE), "w", encoding="utf-8") as f:
        f.write(tokenizer_json)
    path = os.path.join(folder, CONFIG_FILE)
    with open(path) as f:
        info = json.load(f)
    info.update(meta)
    with open(path, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def load_painter(folder: str, vqgan_folder: str | None = None, device: str = "cpu") -> Painter:
    """A painter from a joint model folder; the VQ-GAN from ``vqgan_folder`` or the folder's
    ``vqgan_uri`` (storage-backed, cached locally)."""
    from mmflow.io.cache import materialize
    from mmflow.models.vqgan import load_vqgan

    model, vocab, info = load_joint(folder, device)
    tokenizer = TextTokenizer.load(os.path.join(folder, TOKENIZER_FILE))
    where = vqgan_folder or info.get("vqgan_uri")
    if not where:
        raise FileNotFoundError(f"{folder}: joint.json names no VQ-GAN; pass its folder")
    vqgan, _, _ = load_vqgan(materialize(where), device)
    seen = info.get("seen_text_ids")
    return Painter(model, vocab, tokenizer, vqgan, frozenset(seen) if seen is not None else None,
                   sampling=dict(info.get("sampling") or {}))  # fmt: skip


def draw_to_folder(
    painter: Painter, prompt: str, n: int, sampling: SamplingConfig, out_dir: str
) -> dict[str, Any]:
    """``n`` pictures of ``prompt`` as PNGs and a contact sheet in ``out_dir``."""
    from PIL import Image

    from mmflow.data.images import contact_sheet

    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    pictures = painter.draw([prompt] * n, sampling)
    os.makedirs(out_dir, exist_ok=True)
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pictures]
    files = []
    for i, img in enumerate(images):
        files.append(os.path.join(out_dir, f"{i:03d}.png"))
        img.save(files[-1])
    sheet = os.path.join(out_dir, "contact_sheet.png")
    contact_sheet(images, [prompt] * n, cols=min(8, n), cell=96).save(sheet)
    return {"files": files, "contact_sheet": sheet}


def caption_files(
    painter: Painter, paths: list[str], sampling: SamplingConfig
) -> list[tuple[str, str]]:
    """(path, caption) per picture file; a file that is not a readable picture is named."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: not a picture this machine can read ({e})") from e
    return list(zip(paths, painter.caption(images, sampling), strict=True))
