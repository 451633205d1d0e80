"""``llava_align``: LLaVA's stage 1, feature alignment: only the projector trains.

Inputs: an instruction table (its ``caption`` rows: a picture and "describe it briefly"
answered by its caption), the language model (``lm_train``'s output) and the vision tower:
the pipeline's CLIP (``clip_train``'s output, converted to transformers' ``CLIPVisionModel``,
see :mod:`mmflow.models.llava_vision`) or, with ``vision.pretrained``, a Hugging Face CLIP or
SigLIP model. The vision tower and the LM stay frozen; the projector (``mlp2x_gelu`` or
``linear``) maps the tower's features (layer ``vision.feature_layer``, class token dropped
with ``select_strategy: default``) into the LM's embeddings. On the harness with DeepSpeed
(ZeRO-2 by default; ZeRO-3 and bf16 from ``train``).

Output ``model``: the whole LLaVA as transformers' ``LlavaForConditionalGeneration`` folder
with its processor (``llava_instruct`` continues from it). Metric: ``val_caption_nll`` on
held-out pictures' captions.
"""

from __future__ import annotations

from pydantic import Field

from mmflow.data.instruction_rows import table_pairs
from mmflow.params import Params
from mmflow.stage import Resources, Stage, StageContext, register
from mmflow.tasks.evaluation import stage_metrics
from mmflow.tasks.llava_setup import (
    LlavaCommonParams,
    eval_set,
    publish,
    read_json,
    summary,
    tokenizer_json,
)
from mmflow.train import TrainConfig, fit
from mmflow.train.harness import absolute_tracking_uri

AlignTrainConfig = TrainConfig.with_defaults(
    "AlignTrainConfig", "The harness's config, with llava_align's defaults.",
    strategy="deepspeed", zero_stage=2, max_steps=100, batch_size=32, lr=3e-3, weight_decay=0.0,
    warmup_steps=15, checkpoint_every=100, log_every=10,
)  # fmt: skip


class VisionParams(Params):
    pretrained: str | None = Field(
        None, description="a Hugging Face CLIP/SigLIP (else the clip input)"
    )
    feature_layer: int = Field(
        -2, description="hidden state fed to the projector (-2: penultimate, 0: patch embeddings)"
    )
    select_strategy: str = Field(
        "default", pattern="^(default|full)$", description="default: drop CLS"
    )
    projector: str = Field("mlp2x_gelu", pattern="^(mlp2x_gelu|linear)$")

    def layout(self):
        from mmflow.models.llava import VisionLayout

        return VisionLayout(self.feature_layer, self.select_strategy, self.projector)


class LlavaAlignParams(LlavaCommonParams):
    vision: VisionParams = Field(default_factory=VisionParams)
    train: AlignTrainConfig = Field(default_factory=AlignTrainConfig)


@register
class LlavaAlign(Stage):
    type = "llava_align"
    version = "1"
    description = (
        "LLaVA stage 1: train the projector between a frozen vision tower and a frozen LM."
    )
    Params = LlavaAlignParams
    inputs = {"instructions": "table", "lm": "model", "clip": "model"}
    optional_inputs = frozenset({"clip"})  # else vision.pretrained
    outputs = {"model": "model"}
    resources = Resources(cpus=2, workers=1)
    resumable = True

    def run(self, ctx: StageContext) -> None:
        import os
        import tempfile

        from transformers import CLIPVisionConfig

        from mmflow.io.cache import materialize
        from mmflow.models.llava import feature_layer_index
        from mmflow.models.llava_vision import PIXELS_FILE, prepare_vision_tower
        from mmflow.tasks.llava import LlavaTask

        p: LlavaAlignParams = ctx.params
        clip_uri = ctx.inputs["clip"].uri if "clip" in ctx.inputs else None
        if bool(clip_uri) == bool(p.vision.pretrained):
            raise ValueError(
                f"stage {ctx.stage!r}: wire a `clip` input or set vision.pretrained, exactly one"
            )
        vision_uri = ctx.work("vision_tower")
        if not ctx.storage.exists(
            f"{vision_uri}/{PIXELS_FILE}"
        ):  # made once; a resumed run reuses it
            with tempfile.TemporaryDirectory(prefix="mmflow-vision-") as tmp:
                prepare_vision_tower(tmp, clip_dir=materialize(clip_uri) if clip_uri else None,
                                     pretrained=p.vision.pretrained)  # fmt: skip
                ctx.storage.upload_dir(tmp, vision_uri)
        vision_dir = materialize(vision_uri, ctx.storage)
        pixels = read_json(os.path.join(vision_dir, PIXELS_FILE))
        lm_uri = ctx.inputs["lm"].uri
        tok_json = tokenizer_json(materialize(lm_uri, ctx.storage))
        layout = p.vision.layout()
        vision_config = CLIPVisionConfig.from_pretrained(vision_dir)
        feature_layer_index(layout.feature_layer, vision_config)  # out of range: before training
        image_tokens = layout.image_tokens(vision_config)
        max_len = int(
            read_json(os.path.join(materialize(lm_uri), "config.json"))["max_position_embeddings"]
        )
        pairs = table_pairs(ctx.storage, ctx.inputs["instructions"].uri)
        es = eval_set(ctx, pairs, kinds=("caption",), p=p, vqa_images=0, pixels=pixels)
        print(f"[{ctx.stage}] vision tower {p.vision.pretrained or 'clip_train'} ({image_tokens} image tokens), "
              f"{len(es.val_turns)} held-out captions", flush=True)  # fmt: skip
        task = LlavaTask(
            mode="align", sources={"vision": vision_uri, "lm": lm_uri}, layout=layout, image_processor=pixels,
            image_tokens=image_tokens, eval_set=es, gradient_checkpointing=p.gradient_checkpointing,
            train=p.train, tokenizer_json=tok_json, max_len=max_len, shuffle_buffer=p.shuffle_buffer, cache_mb=p.cache_mb,
            threads=max(1, int(ctx.resources.cpus)),
            data={"pairs": pairs, "kinds": ("caption",), "holdout_fraction": p.holdout_fraction, "images": True}, tracking_uri=absolute_tracking_uri(ctx.tracking_uri),
            run_id=ctx.run_id, save_meta={"vision": p.vision.pretrained or clip_uri, "lm": lm_uri},
        )  # fmt: skip
        final = fit(task, p.train, ctx, model_output="model")
        ctx.log_metrics(stage_metrics(final, eval_prefix=""))
        publish(
            ctx,
            p,
            final,
            "mmflow LLaVA after stage 1 (projector aligned)",
            image_tokens=image_tokens,
        )
        print(f"[{ctx.stage}] trained {int(final.get('step', 0))} steps; "
              f"{summary(ctx, ('val_caption_nll',))}", flush=True)  # fmt: skip
