"""The LLaVA family's training tasks: the language model's pretraining and LLaVA's two stages.

- :class:`LmTask` (``lm_train``): a Llama causal LM on the chat-formatted text of the
  instruction table (captions and conversations, pictures left out), loss on every token.
- :class:`LlavaTask` (``llava_align``, ``llava_instruct``): the Llava model on pictures and
  conversations, loss only on the assistant's turns. ``align`` trains the projector alone
  (vision tower and LM frozen); ``instruct`` the projector and the LM (the vision tower too
  with ``train_vision``).

Each rank reads its own share of the instruction table's (table file, shard) pairs, held-out
keys left out (:meth:`_ChatTask.rows`): no rank holds a copy of the data, and a small one's
examples are kept after the first epoch (``cache_mb``). The sequences are made in a prefetch
thread. (Not Ray Data, as joint_train: its actors take ~20 s to start, a fifth of a quickstart
stage, and a pair is already the natural unit of a streaming read.) A sample is skipped and counted when it cannot be used: ``skipped_undecodable_image``,
``skipped_too_long`` (over the context; truncating would cut the picture or the answer),
``skipped_no_answer`` (no assistant token to learn from). A batch can still end up with no
label (every row cut): it is counted as ``all_masked_batches`` and printed, and its loss is an
explicit zero that changes nothing, never transformers' NaN and never a silent 0.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from mmflow.models.llava import (
    IGNORE,
    IMAGE_TOKEN,
    ChatIds,
    encode_conversation,
    next_token_loss,
    pad_batch,
)
from mmflow.train.config import TrainConfig, TrainTask


def _example_bytes(ex: dict[str, Any]) -> int:
    pixels = ex.get("pixels")
    return (
        16 * (len(ex["ids"]) + len(ex["labels"]))
        + (pixels.nbytes if pixels is not None else 0)
        + 200
    )


class _ChatTask(TrainTask):
    """What the two tasks share: the tokenizer, the stream of padded batches, the counts."""

    def __init__(self, *, data: dict[str, Any], train: TrainConfig, tokenizer_json: str, max_len: int,
                 shuffle_buffer: int, threads: int, save_meta: dict[str, Any], cache_mb: int = 512):  # fmt: skip
        self.data = data  # pairs, kinds, holdout_fraction, images: what rows() reads
        self.train, self.tokenizer_json, self.max_len = train, tokenizer_json, max_len
        self.cache_mb = cache_mb
        self.shuffle_buffer, self.threads, self.save_meta = shuffle_buffer, threads, save_meta
        self.counts: Counter = Counter()
        self._tok = None
        self._step, self._first_pass = 0, True

    @property
    def tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(self.tokenizer_json)
        return self._tok

    @property
    def chat_ids(self) -> ChatIds:
        return ChatIds.of(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def example(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """One row -> ``{"ids", "labels", ...}``, or None (counted)."""
        raise NotImplementedError

    def train_batches(self, rank: int, world_size: int, start_step: int) -> Iterator[dict]:
        from mmflow.tasks.data import prefetched

        return prefetched(self._batches(rank, world_size, start_step))

    def rows(self, rank: int, world: int) -> Iterator[dict[str, Any]]:
        """This rank's training rows: its share of the (table file, shard) pairs, each read
        once in order (:func:`mmflow.tasks.data.assign`: whole pairs per rank, or every
        world-th row of every pair when there are fewer pairs than ranks)."""
        from mmflow.data.instruction_rows import joined_rows
        from mmflow.tasks.data import assign

        share = assign([str(i) for i in range(len(self.data["pairs"]))], rank, world)
        for i in share.shards:
            rows = joined_rows(self.data["pairs"][int(i)], kinds=self.data["kinds"], split="train",
                               holdout_fraction=self.data["holdout_fraction"], images=self.data["images"])  # fmt: skip
            yield from (row for j, row in enumerate(rows) if share.takes(j))

    def _batches(self, rank: int, world: int, start_step: int) -> Iterator[dict]:
        """Padded batches, forever: the first epoch read through a shuffle buffer; later ones
        replayed from memory when this rank's examples fit ``cache_mb`` (decoding pictures and
        tokenizing are most of a small model's data cost), else read again."""
        import numpy as np
        import torch

        from mmflow.train.epochs import Epochs, batches

        rng = random.Random(f"{self.train.seed}-{rank}-{start_step}")
        epochs = Epochs(self.shuffle_buffer, self.cache_mb << 20, _example_bytes)

        def stream() -> Iterator[dict]:
            for row in self.rows(rank, world):
                if self._first_pass:
                    self.counts["samples_seen"] += 1
                if (ex := self.example(row)) is not None:
                    yield ex
            self._first_pass = False

        empty = f"rank {rank}: no usable training rows (see the skipped_* counts)"
        micro = start_step * self.train.grad_accum
        for group in batches(lambda: epochs.epoch(stream, rng), self.train.batch_size, empty):
            batch = pad_batch([(e["ids"], e["labels"]) for e in group], self.chat_ids.pad)
            if "pixels" in group[0]:
                batch["pixel_values"] = torch.from_numpy(np.stack([e["pixels"] for e in group]))
            # the step travels with the batch: the saved step count and the logged names
            batch["step"] = micro // self.train.grad_accum
            yield batch
            micro += 1

    def _skip(self, reason: str) -> None:
        if self._first_pass:  # later passes read the same rows: the counts describe the data
            self.counts[f"skipped_{reason}"] += 1

    def data_counters(self) -> dict[str, int]:
        return dict(self.counts)

    def _fits(self, ids: list[int], labels: list[int]) -> bool:
        if len(ids) > self.max_len:
            self._skip("too_long")
            return False
        if all(y == IGNORE for y in labels[1:]):
            self._skip("no_answer")
            return False
        return True

    def _masked(self, n: int) -> None:
        if n == 0:
            self.counts["all_masked_batches"] += 1
            sys.stdout.write(
                f"[train] warning: a batch at step {self._step} has no labelled token; it is skipped\n"
            )


class LmTask(_ChatTask):
    """A Llama causal LM pretrained on the chat-formatted text of the table."""

    def __init__(self, *, lm_config: dict[str, Any], val_texts: list[list[dict[str, str]]], **kw):
        super().__init__(**kw)
        self.lm_config, self.val_texts = lm_config, val_texts

    def build_model(self):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_num_threads(self.threads)
        return LlamaForCausalLM(LlamaConfig(**self.lm_config))

    def text_ids(self, turns: list[dict[str, str]]) -> list[int]:
        text_only = [
            {**t, "value": t["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")}
            for t in turns
        ]
        ids, _ = encode_conversation(text_only, self.encode, self.chat_ids, image_tokens=0)
        return ids

    def example(self, row):
        ids = self.text_ids(json.loads(row["conversations"]))
        labels = [IGNORE, *ids[1:]]  # every token after <|bos|>
        return {"ids": ids, "labels": labels} if self._fits(ids, labels) else None

    def loss(self, model, batch):
        self._step = batch["step"] + 1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n = next_token_loss(logits, batch["labels"])
        self._masked(n)
        return loss, {"tokens": float(n)}

    def evaluate(self, model) -> dict[str, float]:
        import math

        if not self.val_texts:
            return {}
        dev = next(model.parameters()).device
        total, count = 0.0, 0
        seqs = [(ids, [IGNORE, *ids[1:]]) for ids in map(self.text_ids, self.val_texts)]
        seqs = [s for s in seqs if len(s[0]) <= self.max_len]
        for i in range(0, len(seqs), 64):
            b = {k: v.to(dev) for k, v in pad_batch(seqs[i : i + 64], self.chat_ids.pad).items()}
            loss, n = next_token_loss(
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                b["labels"],
            )
            total, count = total + float(loss) * n, count + n
        nll = total / max(count, 1)
        return {"val_nll": nll, "val_ppl": math.exp(min(nll, 50.0))}

    def save(self, model, out_dir: str) -> None:
        import os

        from tokenizers import Tokenizer

        from mmflow.models.common.hf import save_pretrained
        from mmflow.models.llava import hf_tokenizer

        save_pretrained(out_dir, model, hf_tokenizer(Tokenizer.from_str(self.tokenizer_json)))
        with open(os.path.join(out_dir, "mmflow_lm.json"), "w") as f:
            json.dump(
                {**self.save_meta, "steps": self._step or self.train.max_steps},
                f,
                indent=2,
                sort_keys=True,
            )


class LlavaTask(_ChatTask):
    """LLaVA's stage 1 (``mode="align"``) or stage 2 (``mode="instruct"``) for the harness.

    ``sources``: ``vision`` (a ``CLIPVisionModel`` folder) and ``lm`` (a ``LlamaForCausalLM``
    folder) for ``align``; ``llava`` (stage 1's exported folder) for ``instruct``. Each worker
    builds the same model from them (the projector from the seeded initialisation).
    ``answer_loss``: ``token`` (every answer token weighs the same) or ``answer`` (every answer
    does, see :func:`mmflow.models.llava.next_token_loss`)."""

    def __init__(self, *, mode: str, sources: dict[str, str], layout, image_processor: dict[str, Any],
                 image_tokens: int, train_vision: bool = False, eval_set=None, gradient_checkpointing: bool = False,
                 answer_loss: str = "token", tracking_uri: str = "", run_id: str | None = None, **kw):  # fmt: skip
        super().__init__(**kw)
        if mode not in ("align", "instruct"):
            raise ValueError(f"LlavaTask mode must be align or instruct, got {mode!r}")
        self.mode, self.sources, self.layout = mode, sources, layout
        self.image_processor, self.image_tokens, self.train_vision = (
            image_processor,
            image_tokens,
            train_vision,
        )
        self.eval_set, self.gradient_checkpointing = eval_set, gradient_checkpointing
        if answer_loss not in ("token", "answer"):
            raise ValueError(f"LlavaTask answer_loss must be token or answer, got {answer_loss!r}")
        self.answer_loss = answer_loss
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._pixels = None

    @property
    def pixels(self):
        from mmflow.models.llava import Pixels

        if self._pixels is None:
            self._pixels = Pixels(**self.image_processor)
        return self._pixels

    def build_model(self):
        import torch

        from mmflow.io.cache import materialize
        from mmflow.models.llava import set_trainable

        torch.set_num_threads(self.threads)
        if self.mode == "align":
            model = self._assemble({k: materialize(v) for k, v in self.sources.items()})
        else:
            from transformers import LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration.from_pretrained(
                materialize(self.sources["llava"])
            )
        set_trainable(model, projector=True, lm=self.mode == "instruct", vision=self.train_vision)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def _assemble(self, local: dict[str, str]):
        import os

        from safetensors.torch import load_file
        from transformers import CLIPVisionConfig, LlamaConfig

        from mmflow.models.llava import build_llava, load_parts

        vision_config = CLIPVisionConfig.from_pretrained(local["vision"])
        text_config = LlamaConfig.from_pretrained(local["lm"])
        ids = self.chat_ids
        model = build_llava(vision_config, text_config, ids.image, ids.pad, self.layout)
        load_parts(
            model,
            vision_state=load_file(os.path.join(local["vision"], "model.safetensors")),
            lm_state=load_file(os.path.join(local["lm"], "model.safetensors")),
        )
        return model

    def example(self, row):
        try:
            pixels = self.pixels(row["image"])
        except Exception:  # PIL raises many kinds; the picture is unusable whichever it is
            self._skip("undecodable_image")
            return None
        ids, labels = encode_conversation(json.loads(row["conversations"]), self.encode, self.chat_ids,
                                          self.image_tokens)  # fmt: skip
        return {"ids": ids, "labels": labels, "pixels": pixels} if self._fits(ids, labels) else None

    def loss(self, model, batch):
        self._step = batch["step"] + 1
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"]).logits  # fmt: skip
        loss, n = next_token_loss(logits, batch["labels"], per_answer=self.answer_loss == "answer")
        self._masked(n)
        return loss, {"answer_tokens": float(n)}

    def evaluate(self, model) -> dict[str, float]:
        from mmflow.tasks.llava_eval import evaluate_llava

        if self.eval_set is None:
            return {}
        return evaluate_llava(self, model, self.eval_set)

    def processor(self, vision_config):
        from mmflow.models.llava import hf_tokenizer, processor_for
        from mmflow.models.llava_vision import clip_image_processor

        ip = self.image_processor
        cfg = {"mean": ip["mean"], "std": ip["std"],
               "interpolation": {0: "nearest", 2: "bilinear", 3: "bicubic"}[ip.get("resample", 3)]}  # fmt: skip
        return processor_for(
            hf_tokenizer(self.tokenizer),
            clip_image_processor(cfg, ip["size"]),
            vision_config,
            self.layout,
        )

    def save(self, model, out_dir: str) -> None:
        from mmflow.models.llava import save_llava

        save_llava(model, self.processor(model.config.vision_config), out_dir,
                   **{**self.save_meta, "stage": self.mode, "steps": self._step or self.train.max_steps})  # fmt: skip
