"""Answering questions about a picture with a LLaVA model: batched, KV-cached decoding.

    turns -> chat ids (mmflow.models.llava.encode_conversation, <image> expanded)
      -> prefill: one forward over prompt + picture, caches filled
      -> pick (mmflow.generate.sampling: greedy, temperature, top-k, top-p, seeded)
      -> one token at a time through the caches, until <|end|> or max_new_tokens

The model is transformers' ``LlavaForConditionalGeneration`` (so the loop drives its
``past_key_values``); prompts of one length run as one batch, so no row needs padding and a
batch answers exactly as each prompt would alone. :func:`load_chat` opens an exported folder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmflow.generate.sampling import SamplingConfig, pick
from mmflow.models.llava import IMAGE_TOKEN, ChatIds, encode_conversation

GREEDY = SamplingConfig(temperature=0.0)


@dataclass
class Chat:
    """A LLaVA model with what it needs to answer: tokenizer, picture preprocessing, layout."""

    model: Any  # LlavaForConditionalGeneration, eval mode
    tokenizer: Any  # tokenizers.Tokenizer with the chat tokens
    pixels: Any  # bytes or PIL image -> (3, S, S) float32 array (mmflow.models.llava.Pixels)
    image_tokens: int
    max_len: int  # the LM's context

    def __post_init__(self) -> None:
        self.ids = ChatIds.of(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, turns: list[dict[str, str]]) -> list[int]:
        """The ids of ``turns`` (the last one the user's) with the assistant's turn opened."""
        ids, _ = encode_conversation(
            turns, self.encode, self.ids, self.image_tokens, generation_prompt=True
        )
        return ids

    def check_fits(self, prompt: list[int], max_new_tokens: int) -> None:
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(
                f"the prompt is {len(prompt)} tokens ({self.image_tokens} of them the picture) and "
                f"the answer may take {max_new_tokens}: over the model's context of {self.max_len} tokens"
            )

    @torch.no_grad()
    def answer_batch(
        self,
        pixel_values: torch.Tensor,
        conversations: Sequence[list[dict[str, str]]],
        cfg: SamplingConfig = GREEDY,
        max_new_tokens: int = 16,
    ) -> list[str]:
        """One answer per (picture, conversation); ``pixel_values`` (N, 3, S, S)."""
        prompts = [self.prompt_ids(turns) for turns in conversations]
        for p in prompts:
            self.check_fits(p, max_new_tokens)
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_len[len(p)].append(i)
        answers: list[str] = [""] * len(prompts)
        gen = torch.Generator(device=next(self.model.parameters()).device).manual_seed(cfg.seed)
        for rows in by_len.values():
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long)
            out = self._decode(ids, pixel_values[rows], cfg, gen, max_new_tokens)
            for i, new in zip(rows, out, strict=True):
                answers[i] = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return answers

    def _decode(self, ids, pixel_values, cfg, gen, max_new_tokens) -> list[list[int]]:
        dev = next(self.model.parameters()).device
        ids, pixel_values = ids.to(dev), pixel_values.to(dev, next(self.model.parameters()).dtype)
        out = self.model(input_ids=ids, pixel_values=pixel_values, use_cache=True)
        past, logits = out.cache, out.logits[:, -1].float()  # (B, V)
        new = [[] for _ in range(ids.shape[0])]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
        for step in range(max_new_tokens):
            nxt = pick(logits, cfg, gen if cfg.temperature > 0 else None)  # (B,)
            for b in range(len(new)):
                if not done[b]:
                    new[b].append(int(nxt[b]))
            done |= nxt == self.ids.end
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            out = self.model(input_ids=nxt[:, None], cache=past, use_cache=True)
            past, logits = out.cache, out.logits[:, -1].float()
        return [[t for t in row if t != self.ids.end] for row in new]

    def ask(self, image: Any, question: str, history: list[dict[str, str]] | None = None,
            cfg: SamplingConfig = GREEDY, max_new_tokens: int = 32) -> str:  # fmt: skip
        """One answer about ``image`` (bytes or PIL); ``history`` the earlier turns, whose
        first human turn holds the ``<image>``."""
        turns = list(history or [])
        text = question if turns else f"{IMAGE_TOKEN}\n{question}"
        turns.append({"from": "human", "value": text})
        px = torch.from_numpy(self.pixels(image))[None]
        return self.answer_batch(px, [turns], cfg, max_new_tokens)[0]


def load_chat(folder: str, device: str = "cpu") -> Chat:
    """A :class:`Chat` over an exported LLaVA folder (``llava_instruct``'s or ``llava_align``'s
    ``model``; any local path or storage URI)."""
    import os

    from tokenizers import Tokenizer
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmflow.io.cache import materialize
    from mmflow.models.llava import Pixels, VisionLayout

    local = materialize(folder) if "://" in folder else folder
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise ValueError(f"{folder}: not a LLaVA model folder (no config.json)")
    model = LlavaForConditionalGeneration.from_pretrained(local).to(device).eval()
    processor = AutoProcessor.from_pretrained(local)
    layout = VisionLayout(model.config.vision_feature_layer, model.config.vision_feature_select_strategy,
                          "linear" if model.config.projector_hidden_act == "linear" else "mlp2x_gelu")  # fmt: skip
    tok = Tokenizer.from_file(os.path.join(local, "tokenizer.json"))
    return Chat(
        model, tok, Pixels.of(processor.image_processor), layout.image_tokens(model.config.vision_config),
        int(model.config.text_config.max_position_embeddings),
    )  # fmt: skip


def read_image(path: str):
    """The picture at ``path`` as RGB (PIL); a clear error naming the file when it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such picture") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a picture PIL can read ({e})") from None


def chat_session(chat: Chat, image, cfg: SamplingConfig = GREEDY, max_new_tokens: int = 32,
                 read=input, write=print) -> list[dict[str, str]]:  # fmt: skip
    """Several turns about one picture, read from ``read`` until an empty line or end of input;
    returns the conversation."""
    history: list[dict[str, str]] = []
    while True:
        try:
            question = read("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        try:
            answer = chat.ask(image, question, history, cfg, max_new_tokens)
        except ValueError as e:  # over the context: say so and end, the history cannot grow
            write(f"mmflow chat: {e}")
            break
        write(f"llava> {answer}")
        first = not history
        history += [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if first else question},
                    {"from": "gpt", "value": answer}]  # fmt: skip
    return history
