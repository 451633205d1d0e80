"""``lm_train``: the language model LLaVA builds on, pretrained by the pipeline or named.

Default: a byte-level BPE tokenizer trained on the instruction table's text, given the chat
tokens (``<|user|>``, ``<|assistant|>``, ``<|end|>``) and ``<image>``, and a Llama causal LM
from a named architecture (``models/configs/llava/``: ``lm-tiny`` for the quickstart,
``lm-160m``, ``lm-1b``) pretrained on that text, chat-formatted, pictures left out
(:class:`mmflow.tasks.llava.LmTask`), on the harness with DeepSpeed. Held-out keys (the split
every stage shares) give ``val_nll`` and ``val_ppl``.

With ``pretrained`` set (a Hugging Face causal LM: hub name or local path) the model is loaded
and not trained: the chat tokens are added to its tokenizer when missing (embeddings resized)
and the chat template set.

Output ``model``: a folder ``AutoModelForCausalLM`` / ``AutoTokenizer`` load (safetensors,
``tokenizer.json`` with the chat template), which ``llava_align`` takes as its LM.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, model_validator

from mmflow.data.instruction_rows import heldout_rows, joined_rows, table_pairs
from mmflow.export.mlflow import publish_model
from mmflow.stage import Resources, Stage, StageContext, register
from mmflow.tasks.evaluation import stage_metrics
from mmflow.tasks.llava_setup import ChatStageParams
from mmflow.train import TrainConfig, fit

LmTrainConfig = TrainConfig.with_defaults(
    "LmTrainConfig", "The harness's config, with lm_train's defaults.",
    strategy="deepspeed", max_steps=100, batch_size=32, lr=3e-3, weight_decay=0.05,
    warmup_steps=20, checkpoint_every=100, log_every=10,
)  # fmt: skip


class LmTrainParams(ChatStageParams):
    arch: str = Field("lm-tiny", description="LM architecture (models/configs/llava/*.json)")
    model_cfg: dict[str, Any] | None = Field(None, description="LlamaConfig fields to override")
    pretrained: str | None = Field(None, description="a Hugging Face causal LM to use untrained")
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary (before the chat tokens)")
    train: LmTrainConfig = Field(default_factory=LmTrainConfig)
    val_rows: int = Field(256, ge=0, description="held-out rows for val_nll")

    @model_validator(mode="after")
    def _check(self) -> LmTrainParams:
        if not self.pretrained:
            from mmflow.models.llava import lm_fields

            lm_fields(self.arch, self.model_cfg)  # an unknown architecture or field fails at load
        return self


def _turns(rows) -> list[list[dict[str, str]]]:
    return [json.loads(r["conversations"]) for r in rows]


@register
class LmTrain(Stage):
    type = "lm_train"
    version = "1"
    description = (
        "Pretrain a small Llama LM (and its chat tokenizer) on the instruction text, or load one."
    )
    Params = LmTrainParams
    inputs = {"instructions": "table"}
    outputs = {"model": "model"}
    resources = Resources(cpus=2, workers=1)
    resumable = True  # a rerun resumes from the newest complete checkpoint in _work

    def run(self, ctx: StageContext) -> None:
        p: LmTrainParams = ctx.params
        if p.pretrained:
            return self._pretrained(ctx, p)
        import torch
        from transformers import LlamaForCausalLM

        from mmflow.data.text_tokenizer import TextTokenizer
        from mmflow.models.llava import BOS, EOS, PAD, add_chat_tokens, lm_config
        from mmflow.tasks.llava import LmTask

        pairs = table_pairs(ctx.storage, ctx.inputs["instructions"].uri)
        kinds = ("caption", "conversation")
        rows = (r for pair in pairs for r in joined_rows(pair, kinds=kinds, split="train",
                holdout_fraction=p.holdout_fraction, images=False))  # fmt: skip
        corpus = (
            t["value"].replace("<image>", "") for r in rows for t in json.loads(r["conversations"])
        )
        tok = TextTokenizer.train(corpus, p.vocab_size)
        add_chat_tokens(tok.tokenizer)
        ids = {
            n: tok.tokenizer.token_to_id(t) for n, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))
        }
        cfg = lm_config(p.arch, p.model_cfg, vocab_size=tok.tokenizer.get_vocab_size())
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
        val = _turns(heldout_rows(pairs, kinds=kinds, holdout_fraction=p.holdout_fraction, limit=p.val_rows,
                                  images=False, one_per_picture=False))  # fmt: skip
        with torch.device("meta"):  # counted without allocating (lm-1b would take GBs here)
            params = sum(x.numel() for x in LlamaForCausalLM(cfg).parameters())
        print(f"[{ctx.stage}] {p.arch}: {params / 1e6:.2f}M parameters, vocabulary "
              f"{cfg.vocab_size} ({tok.source}); {len(val)} held-out texts", flush=True)  # fmt: skip
        task = LmTask(
            lm_config=cfg.to_dict(), val_texts=val, train=p.train, tokenizer_json=tok.tokenizer.to_str(),
            max_len=cfg.max_position_embeddings, shuffle_buffer=p.shuffle_buffer, cache_mb=p.cache_mb,
            threads=max(1, int(ctx.resources.cpus)),
            data={"pairs": pairs, "kinds": kinds, "holdout_fraction": p.holdout_fraction, "images": False},
            save_meta={"arch": p.arch, "instructions_fingerprint": ctx.inputs["instructions"].fingerprint},
        )  # fmt: skip
        final = fit(task, p.train, ctx, model_output="model")
        ctx.log_metrics(stage_metrics(final, eval_prefix=""))
        self._publish(ctx, p, steps=int(final.get("step", 0)), params=params)
        shown = ", ".join(
            f"{k}={ctx.metrics[k]:.3f}" for k in ("val_nll", "val_ppl") if k in ctx.metrics
        )
        print(f"[{ctx.stage}] trained {int(final.get('step', 0))} steps; {shown}", flush=True)

    def _pretrained(self, ctx: StageContext, p: LmTrainParams) -> None:
        """A Hugging Face causal LM, given the chat tokens and template, written as the output."""
        import tempfile

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mmflow.models.common.hf import save_pretrained
        from mmflow.models.llava import CHAT_TEMPLATE, CHAT_TOKENS, IMAGE_TOKEN

        tok = AutoTokenizer.from_pretrained(p.pretrained)
        model = AutoModelForCausalLM.from_pretrained(p.pretrained)
        added = tok.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
        for name, fallback in (("bos_token", "<|bos|>"), ("pad_token", "<|pad|>")):
            if getattr(tok, name) is None:
                added += tok.add_special_tokens({name: fallback})
        if added:
            model.resize_token_embeddings(len(tok))
        tok.chat_template, tok.image_token = CHAT_TEMPLATE, IMAGE_TOKEN
        with tempfile.TemporaryDirectory(prefix="mmflow-lm-") as tmp:
            save_pretrained(tmp, model, tok)
            ctx.storage.upload_dir(tmp, ctx.outputs["model"])
        print(
            f"[{ctx.stage}] {p.pretrained}: loaded, {added} tokens added, not trained", flush=True
        )
        self._publish(ctx, p, steps=0, params=sum(x.numel() for x in model.parameters()))

    def _publish(self, ctx: StageContext, p: LmTrainParams, steps: int, params: int) -> None:
        name = (
            f"{ctx.pipeline}-{ctx.stage}"
            if p.registered_model_name is None
            else p.registered_model_name
        )
        registered = publish_model(ctx.outputs["model"], ctx.tracking_uri, ctx.run_id, name or None,
                                   "mmflow LLaVA language model", storage=ctx.storage)  # fmt: skip
        ctx.record_output("model", arch=p.pretrained or p.arch, format="hf-causal-lm", steps=steps,
                          parameters=params, load="transformers.AutoModelForCausalLM.from_pretrained('<this folder>')",
                          **registered)  # fmt: skip
