"""What ``llava_align`` and ``llava_instruct`` share: their common params, the held-out set
made in a Ray task, the facts read from a model folder, and the publishing at the end."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import Field

from mmflow.params import Params


class ChatStageParams(Params):
    """Params every stage of the LLaVA family takes (lm_train, llava_align, llava_instruct)."""

    holdout_fraction: float = Field(
        0.05, ge=0, lt=1,
        description="share of keys held out (0.05: the keys clip_train holds out too, so the "
        "evaluation's pictures were held out of every training stage)",
    )  # fmt: skip
    val_rows: int = Field(128, ge=0, description="held-out rows for the validation NLL")
    shuffle_buffer: int = Field(2048, ge=1)
    cache_mb: int = Field(
        512,
        ge=0,
        description="a rank's examples kept in memory after epoch 1 (0 = stream every epoch)",
    )
    registered_model_name: str | None = Field(
        None, description="default '{pipeline}-{stage}'; '' = none"
    )


class LlavaCommonParams(ChatStageParams):
    """Params both LLaVA stages take."""

    gradient_checkpointing: bool = False


def tokenizer_json(model_dir: str) -> str:
    """The ``tokenizer.json`` of a local model folder (lm_train's or a LLaVA export)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir}: no tokenizer.json (an lm_train or LLaVA model folder?)")
    with open(path, encoding="utf-8") as f:
        return f.read()


def pixels_of_export(model_dir: str) -> dict[str, Any]:
    """The preprocessing settings of an exported LLaVA folder (its image processor's)."""
    from transformers import AutoImageProcessor

    from mmflow.models.llava_vision import pixels_of

    return pixels_of(AutoImageProcessor.from_pretrained(model_dir))


def eval_set(
    ctx, pairs, *, kinds: tuple[str, ...], p: LlavaCommonParams, vqa_images: int, pixels: dict
):
    """:func:`mmflow.tasks.llava_eval.build_eval_set` in a Ray task on the stage's CPUs."""
    import ray

    from mmflow.tasks.llava_eval import build_eval_set

    make = ray.remote(build_eval_set).options(num_cpus=ctx.resources.cpus)
    return ray.get(make.remote(pairs, kinds=kinds, holdout_fraction=p.holdout_fraction,
                               val_rows=p.val_rows, vqa_images=vqa_images, pixels=pixels))  # fmt: skip


def publish(
    ctx, p: LlavaCommonParams, final: dict[str, float], description: str, **info: Any
) -> None:
    """Log and register the exported folder; record its manifest facts."""
    from mmflow.export.mlflow import publish_model

    name = (
        f"{ctx.pipeline}-{ctx.stage}"
        if p.registered_model_name is None
        else p.registered_model_name
    )
    registered = publish_model(ctx.outputs["model"], ctx.tracking_uri, ctx.run_id, name or None, description,
                               storage=ctx.storage)  # fmt: skip
    ctx.record_output(
        "model", format="hf-llava", steps=int(final.get("step", 0)),
        load="transformers.LlavaForConditionalGeneration.from_pretrained('<this folder>')",
        **info, **registered,
    )  # fmt: skip


def summary(ctx, names: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={ctx.metrics[k]:.3f}" for k in names if k in ctx.metrics)


def read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
