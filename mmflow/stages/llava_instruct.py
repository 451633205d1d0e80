"""``llava_instruct``: LLaVA's stage 2, visual instruction tuning: projector and LM train.

Input ``align``: ``llava_align``'s model (so ``--only llava_instruct`` reruns stage 2 on the
committed stage-1 projector); ``instructions``: the table's ``conversation`` rows. The loss
is on the assistant's turns only (every other label -100; a batch left with none is counted,
never a silent 0). The vision tower stays frozen unless ``train_vision``. On the harness with
DeepSpeed (ZeRO-2 by default; ZeRO-3, bf16, gradient checkpointing from params).

Held-out evaluation (:mod:`mmflow.tasks.llava_eval`), on pictures held out of every training
stage: ``vqa_acc`` and ``vqa_acc_<type>``, ``vqa_acc_wrong_image``, ``describe_match``,
``val_answer_nll``; sample answers as an MLflow table and pictures.

Output ``model``: the folder ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load offline; ``mmflow chat`` answers with it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmflow.data.instruction_rows import table_pairs
from mmflow.stage import Resources, Stage, StageContext, register
from mmflow.tasks.evaluation import stage_metrics
from mmflow.tasks.llava_setup import (
    LlavaCommonParams,
    eval_set,
    pixels_of_export,
    publish,
    summary,
    tokenizer_json,
)
from mmflow.train import TrainConfig, fit
from mmflow.train.harness import absolute_tracking_uri

InstructTrainConfig = TrainConfig.with_defaults(
    "InstructTrainConfig", "The harness's config, with llava_instruct's defaults.",
    strategy="deepspeed", zero_stage=2, max_steps=300, batch_size=32, lr=2e-3, weight_decay=0.0,
    warmup_steps=30, checkpoint_every=150, log_every=20,
)  # fmt: skip

SHOWN = ("vqa_acc", "vqa_acc_color", "vqa_acc_shape", "vqa_acc_count", "vqa_acc_position",
         "vqa_acc_yesno", "vqa_acc_wrong_image", "describe_match")  # fmt: skip


class LlavaInstructParams(LlavaCommonParams):
    train: InstructTrainConfig = Field(default_factory=InstructTrainConfig)
    train_vision: bool = Field(False, description="unfreeze the vision tower too")
    answer_loss: Literal["token", "answer"] = Field(
        "token", description="every answer token weighs the same, or every answer"
    )
    vqa_images: int = Field(
        64, ge=0, description="held-out pictures asked one question of each type"
    )


@register
class LlavaInstruct(Stage):
    type = "llava_instruct"
    version = "1"
    description = "LLaVA stage 2: instruction-tune projector and LM on conversations; VQA accuracy."
    Params = LlavaInstructParams
    inputs = {"instructions": "table", "align": "model"}
    outputs = {"model": "model"}
    resources = Resources(cpus=2, workers=1)
    resumable = True

    def run(self, ctx: StageContext) -> None:
        from transformers import AutoConfig

        from mmflow.io.cache import materialize
        from mmflow.models.llava import VisionLayout
        from mmflow.tasks.llava import LlavaTask

        p: LlavaInstructParams = ctx.params
        align_uri = ctx.inputs["align"].uri
        local = materialize(align_uri, ctx.storage)
        config = AutoConfig.from_pretrained(local)
        layout = VisionLayout(config.vision_feature_layer, config.vision_feature_select_strategy,
                              "linear" if config.projector_hidden_act == "linear" else "mlp2x_gelu")  # fmt: skip
        image_tokens = layout.image_tokens(config.vision_config)
        pixels = pixels_of_export(local)
        pairs = table_pairs(ctx.storage, ctx.inputs["instructions"].uri)
        es = eval_set(
            ctx, pairs, kinds=("conversation",), p=p, vqa_images=p.vqa_images, pixels=pixels
        )
        print(f"[{ctx.stage}] {len(es.val_turns)} held-out conversations, {len(es.pictures)} held-out "
              f"pictures to question", flush=True)  # fmt: skip
        task = LlavaTask(
            mode="instruct", sources={"llava": align_uri}, layout=layout, image_processor=pixels,
            image_tokens=image_tokens, train_vision=p.train_vision, eval_set=es, answer_loss=p.answer_loss,
            gradient_checkpointing=p.gradient_checkpointing, train=p.train, tokenizer_json=tokenizer_json(local),
            max_len=int(config.text_config.max_position_embeddings), shuffle_buffer=p.shuffle_buffer, cache_mb=p.cache_mb,
            threads=max(1, int(ctx.resources.cpus)),
            data={"pairs": pairs, "kinds": ("conversation",), "holdout_fraction": p.holdout_fraction, "images": True}, tracking_uri=absolute_tracking_uri(ctx.tracking_uri),
            run_id=ctx.run_id, save_meta={"align": align_uri},
        )  # fmt: skip
        final = fit(task, p.train, ctx, model_output="model")
        ctx.log_metrics(stage_metrics(final, eval_prefix=""))
        publish(ctx, p, final, "mmflow LLaVA (instruction-tuned)", image_tokens=image_tokens)
        print(
            f"[{ctx.stage}] trained {int(final.get('step', 0))} steps; {summary(ctx, SHOWN)}",
            flush=True,
        )
