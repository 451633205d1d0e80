"""``clip_train``: train an open_clip model from scratch on a shard dataset.

The model is any open_clip architecture (``mmflow-clip-tiny`` by default, or
a custom config given inline), trained by :class:`mmflow.tasks.clip.ClipTask` (open_clip's
contrastive loss, each rank streaming its share of the shards, retrieval on held-out pairs)
through the shared harness (:mod:`mmflow.train`): DDP on Ray Train, any number of workers.
A deterministic slice of keys (by hash) is held out.

Metrics (manifest and ``mmflow status``): ``final_loss``, the final model's ``heldout_*``
(recall@1/@5 both ways, ``roc_auc`` when the data carries ground truth), and what the loaders
read and skipped: ``samples_seen``, ``skipped_<reason>``, ``skipped_total``, and the same with
``heldout_`` for the held-out set (:mod:`mmflow.tasks.evaluation`).

The default schedule is short on purpose: the model later scores the very
pairs it trained on, and with many more epochs it starts to memorise the
mismatched ones (their scores rise towards the clean ones').

The output is a folder open_clip loads directly (see :func:`mmflow.models.clip.save_clip`);
it is also logged to the stage's MLflow run as the ``model`` artifact
(:func:`mmflow.export.mlflow.publish_model`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from mmflow.data.shards import list_shards
from mmflow.export.mlflow import publish_model
from mmflow.models.clip import model_config, register_config
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.tasks.clip import ClipTask
from mmflow.tasks.data import ShardData
from mmflow.tasks.evaluation import stage_metrics
from mmflow.train import TrainConfig, fit

# defaults that train ``mmflow-clip-tiny`` on the quickstart in about a minute; much longer
# training memorises the noisy pairs it will score, and contrastive batches want to be big
ClipTrainConfig = TrainConfig.with_defaults(
    "ClipTrainConfig", "The harness's config, with clip_train's defaults.",
    max_steps=150, batch_size=Field(256, ge=2, description="micro batch per worker"),
    lr=2e-3, weight_decay=0.1, warmup_steps=30, checkpoint_every=100, log_every=10,
)  # fmt: skip


class ClipTrainParams(Params):
    arch: str = Field(
        "mmflow-clip-tiny", description="open_clip architecture (or the name for model_cfg)"
    )
    model_cfg: dict[str, Any] | None = Field(
        None,
        description="custom open_clip config (embed_dim, vision_cfg, text_cfg), registered as `arch`",
    )
    train: ClipTrainConfig = Field(default_factory=ClipTrainConfig)
    holdout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="share of keys held out for eval"
    )
    eval_samples: int = Field(
        1000, ge=0, description="held-out pairs evaluated (0 = no retrieval eval)"
    )
    shuffle_buffer: int = Field(2048, ge=1, description="samples shuffled together while streaming")
    augment: bool = Field(
        False,
        description="open_clip's train transform (random resized crop); off: "
        "at 32 px a crop shifts shapes against the captions' position words",
    )
    cache_mb: int = Field(
        1024,
        ge=0,
        description="per worker: keep preprocessed samples in memory "
        "when they fit, instead of decoding every epoch (not with augment)",
    )

    @model_validator(mode="after")
    def _check(self) -> ClipTrainParams:
        if self.model_cfg is not None and not all(
            k in self.model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
        ):
            raise ValueError(
                "model_cfg needs embed_dim, vision_cfg and text_cfg (an open_clip model config)"
            )
        return self


@register
class ClipTrain(Stage):
    type = "clip_train"
    version = "1"
    description = (
        "Train an open_clip model (contrastive loss) on shards with the shared DDP harness."
    )
    Params = ClipTrainParams
    inputs = {"shards": "shards"}
    outputs = {"model": "model"}
    resources = Resources(cpus=2, workers=1)
    resumable = True  # a rerun resumes from the newest complete checkpoint in _work

    def run(self, ctx: StageContext) -> None:
        p: ClipTrainParams = ctx.params
        if p.model_cfg is not None:
            register_config(p.arch, p.model_cfg)
        cfg = p.model_cfg or model_config(p.arch)
        shards = list_shards(ctx.storage, ctx.inputs["shards"].uri)
        if not shards:
            raise ValueError(f"no .tar shards in {ctx.inputs['shards'].uri}")
        task = ClipTask(
            ShardData.from_params(shards, p),
            arch=p.arch,
            model_cfg=cfg,
            train=p.train,
            augment=p.augment,
            threads=max(1, int(ctx.resources.cpus)),
        )
        final = fit(task, p.train, ctx, model_output="model")
        # the harness logged the history; these last values go to the manifest (and `mmflow status`)
        ctx.log_metrics(stage_metrics(final, eval_prefix="heldout"))
        logged = publish_model(
            ctx.outputs["model"], ctx.tracking_uri, ctx.run_id, storage=ctx.storage
        )
        ctx.record_output(
            "model",
            arch=p.arch,
            format="open_clip",
            steps=int(final.get("step", 0)),
            load="open_clip.create_model_and_transforms('local-dir:<this folder>')",
            **logged,
        )
