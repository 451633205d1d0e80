"""``joint_train``: one decoder over caption and image tokens, trained with DeepSpeed.

Inputs: the ``pretokenize`` token table (its metadata gives the codebook, the grid and the
caption tokenizer), optionally the VQ-GAN that made it (else the table's metadata names
it), and optionally the shards the table was made from, whose ``synth_shapes`` ground truth
makes the judged figures possible, and optionally a CLIP (``clip``: e.g. ``clip_train``'s model,
or one named in ``params.clip``) that scores the drawn pictures against their prompts. The
table streams through Ray Data to the workers, held-out
keys filtered out; the task (:mod:`mmflow.tasks.joint`) builds text->image sequences and, for
``i2t_share`` of them, image->text ones, and drops ``cond_dropout`` of the captions for
classifier-free guidance. The harness runs it: DeepSpeed (ZeRO stage, precision, gradient
accumulation from ``train``) by default, DDP on request; checkpoints and resume; with ZeRO-3
the final model is gathered into one plain state dict.

Held-out figures (``mmflow status``): ``val_text_nll``, ``val_image_nll``; with ground
truth ``t2i_color_match``, ``t2i_shape_match``, ``t2i_match`` (guided) and their
``_noguide`` twins, ``i2t_match``, and the judge's own ``judge_acc`` on real pictures; with a
CLIP ``t2i_clip_score`` (and ``_noguide``) beside ``real_clip_score``, the real pictures' score
against the same prompts. Without ground truth the prompts are held-out captions and the CLIP
scores are the drawing's only figures.

Output ``model``: a folder :func:`mmflow.generate.joint.load_painter` reads (safetensors,
``joint.json``, the caption tokenizer); also logged and registered in MLflow.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from mmflow.data.shards import list_shards
from mmflow.data.token_table import dataset_of, longest_text, open_table
from mmflow.export.mlflow import publish_model
from mmflow.models.clip import ClipSpec
from mmflow.params import Params
from mmflow.stage import Resources, Stage, StageContext, register
from mmflow.tasks.evaluation import stage_metrics
from mmflow.train import TrainConfig, fit
from mmflow.train.harness import absolute_tracking_uri

if TYPE_CHECKING:
    from mmflow.models.joint import JointVocab

# DeepSpeed by default, sized for the quickstart on two CPUs
JointTrainConfig = TrainConfig.with_defaults(
    "JointTrainConfig", "The harness's config, with joint_train's defaults.",
    strategy="deepspeed", max_steps=1500, batch_size=32, lr=3e-3, weight_decay=0.05,
    warmup_steps=40, checkpoint_every=500, log_every=20,
)  # fmt: skip


class SamplingParams(Params):
    """How pictures are drawn at evaluation (logged as the run's params)."""

    temperature: float = Field(0.7, ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    guidance_scale: float | Literal["auto"] = Field(
        3.0, description="classifier-free guidance; 1 = none; 'auto': at each evaluation the "
        "best of guidance_sweep on draws of their own (another seed), saved with the model",
    )  # fmt: skip
    seed: int = 0

    @field_validator("guidance_scale")
    @classmethod
    def _scale(cls, v: float | str) -> float | str:
        if v != "auto" and v < 0:
            raise ValueError(f"must be >= 0 or 'auto', got {v}")
        return v

    @property
    def auto(self) -> bool:
        return self.guidance_scale == "auto"

    def saved(self) -> dict[str, Any]:
        """The settings as saved with the model (``auto``: each evaluation writes its choice)."""
        return {**self.model_dump(), **({"guidance_scale": 1.0} if self.auto else {})}

    def build(self):
        """The settings as a SamplingConfig; with ``auto`` guidance 1 until an evaluation
        chooses (nothing is drawn before one)."""
        from mmflow.generate.sampling import SamplingConfig

        return SamplingConfig(**self.saved())


class JointTrainParams(Params):
    arch: str = Field("joint-tiny", description="architecture (models/configs/joint/*.json)")
    model_cfg: dict[str, Any] | None = Field(None, description="architecture fields to override")
    train: JointTrainConfig = Field(default_factory=JointTrainConfig)
    i2t_share: float = Field(0.3, ge=0, le=1, description="share of image->text sequences")
    cond_dropout: float = Field(0.1, ge=0, lt=1, description="captions dropped (guidance)")
    text_loss_weight: float = Field(1.0, ge=0)
    image_loss_weight: float = Field(1.0, ge=0)
    max_text_len: int | None = Field(
        None, ge=1, description="caption tokens per sequence; default: the table's longest"
    )
    prompt_repeats: int = Field(
        2, ge=1, le=8, description="times a text->image prompt is written before its picture "
        "(2: the drawing follows the prompt far sooner; left unset, fewer when the context "
        "cannot hold them; docs/joint.md)",
    )  # fmt: skip
    activation_checkpointing: bool = False
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="share of keys held out")
    val_rows: int = Field(512, ge=0, description="held-out rows for the validation NLL")
    eval_prompts: int = Field(128, ge=0, description="held-out single-object prompts drawn")
    eval_captions: int = Field(128, ge=0, description="held-out pictures captioned")
    judge_steps: int = Field(300, ge=1, description="attribute judge training steps")
    judge_images: int = Field(3000, ge=1, description="real pictures the judge trains on")
    shuffle_buffer: int = Field(2048, ge=1, description="rows shuffled together per worker")
    cache_mb: int = Field(
        512, ge=0, description="a worker's share of the table kept in memory after the first "
        "epoch when it fits (every worker decides alike); 0 = every epoch streamed again",
    )  # fmt: skip
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    guidance_sweep: list[float] = Field(
        [1.0, 1.5, 2.0, 3.0, 5.0],
        description="guidance scales also tried at eval: t2i_match_best, t2i_best_guidance",
    )
    preview: int = Field(16, ge=0, description="drawn pictures in the logged grid")
    clip: ClipSpec = Field(
        default_factory=ClipSpec,
        description="CLIP scoring the drawn pictures when no `clip` input is wired",
    )
    registered_model_name: str | None = Field(
        None, description="MLflow registry name; default '{pipeline}-{stage}'; '' = none"
    )

    @model_validator(mode="after")
    def _check(self) -> JointTrainParams:
        self.model_config_()  # an unknown architecture or field fails at load
        if self.sampling.auto and not (self.guidance_sweep and self.eval_prompts):
            raise ValueError(
                "sampling.guidance_scale: auto picks a scale from guidance_sweep on eval_prompts "
                f"drawn prompts; got guidance_sweep={self.guidance_sweep}, "
                f"eval_prompts={self.eval_prompts}"
            )
        return self

    def model_config_(self):
        from mmflow.models.joint_config import joint_config

        return joint_config(self.arch, self.model_cfg)


def _clip_plan(ctx: StageContext, p: JointTrainParams) -> dict[str, Any] | None:
    """Where rank 0 loads the scoring CLIP from: the wired ``clip`` input or ``params.clip``
    (never both: ``check_wiring`` refuses that when the pipeline loads); None for none."""
    wired = ctx.inputs.get("clip")
    if wired is not None:
        return {"uri": wired.uri, "run_id": wired.manifest.get("mlflow_run_id"), "spec": None}
    return {"uri": None, "run_id": None, "spec": p.clip.model_dump()} if p.clip.is_set else None


def fitting_vocab(p: JointTrainParams, vocab: JointVocab, context: int) -> JointVocab:
    """``vocab`` writing prompts ``p.prompt_repeats`` times; left at its default, as many
    times as ``context`` holds, at least once (web captions can be too long to write twice)."""
    if "prompt_repeats" in p.model_fields_set:
        return replace(vocab, prompt_repeats=p.prompt_repeats)
    for repeats in range(p.prompt_repeats, 0, -1):
        fitted = replace(vocab, prompt_repeats=repeats)
        if fitted.seq_len <= context or repeats == 1:
            return fitted


def _table_facts(ctx: StageContext):
    """(the token table's files, its metadata, a dataset over it); the metadata must give the
    grid, codebook and tokenizer."""
    uri = ctx.inputs["tokens"].uri
    needed = ("codebook_size", "grid_h", "grid_w", "text_vocab_size", "text_tokenizer_uri")
    try:
        dataset, meta, files = open_table(uri, required=needed)
    except FileNotFoundError as e:  # a stage input, not a missing file of the user's
        raise ValueError(str(e)) from None
    return files, meta, dataset


def _share_fits(rows: int, workers: int, seq_len: int, cache_mb: int) -> bool:
    """Whether one worker's share of ``rows`` (held-out ones counted too: an upper bound) fits
    ``cache_mb`` as the Python lists the task keeps (about 40 bytes a token id)."""
    per_worker = -(-rows // max(1, workers))
    return cache_mb > 0 and per_worker * (40 * seq_len + 200) <= cache_mb << 20


def _longest_caption(files: list[str]) -> int:
    return longest_text(dataset_of(files))


def _read_training_rows(batch, holdout_fraction: float):
    """One table file at a time (a Ray Data task), row group by row group, minus held-out keys."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmflow.data.holdout import is_held_out
    from mmflow.storage import Storage

    storage = Storage()
    for uri in batch["uri"].to_pylist():
        with storage.open_input(uri) as f:
            pf = pq.ParquetFile(f)
            for group in range(pf.num_row_groups):
                t = pf.read_row_group(group, columns=["key", "text_ids", "image_tokens"])
                keep = [not is_held_out(k, holdout_fraction) for k in t["key"].to_pylist()]
                yield t.filter(pa.array(keep, pa.bool_()))


def training_rows(files: list[str], holdout_fraction: float):
    """The table's rows minus the held-out keys, as a Ray Dataset streamed to the workers.

    Built from the file list, not ``read_parquet``: its file-listing step reserves a CPU that
    the training workers already hold (a deadlock on a machine they fill), and reading a
    token table is light next to a training step, so every step here reserves none."""
    import ray

    ds = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(
        _read_training_rows,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        fn_kwargs={"holdout_fraction": holdout_fraction},
    )
    # the harness shows progress and rates; Ray Data's own lines every epoch would drown them
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    return ds


@register
class JointTrain(Stage):
    type = "joint_train"
    version = "1"
    description = "Train one decoder over caption and image tokens (DeepSpeed), both directions."
    Params = JointTrainParams
    inputs = {"tokens": "table", "vqgan": "model", "shards": "shards", "clip": "model"}
    # else the table's VQ-GAN; no judge; no CLIP score (unless params.clip names one)
    optional_inputs = frozenset({"vqgan", "shards", "clip"})
    outputs = {"model": "model"}
    resources = Resources(cpus=2, workers=1)
    resumable = True  # a rerun resumes from the newest complete checkpoint in _work

    @classmethod
    def check_wiring(cls, params: JointTrainParams, wired: set[str]) -> list[tuple[str, str]]:
        errors = []
        if "clip" in wired and params.clip.is_set:
            errors.append(("params.clip", "the CLIP is also wired as input `clip`; keep one"))
        if params.sampling.auto and not ({"shards", "clip"} & wired or params.clip.is_set):
            errors.append(("params.sampling.guidance_scale", "auto needs a judge of the drawn "
                           "pictures: the `shards` input (synth_shapes ground truth) or a CLIP "
                           "(the `clip` input or params.clip)"))  # fmt: skip
        return errors

    def run(self, ctx: StageContext) -> None:
        import ray

        from mmflow.io.cache import materialize
        from mmflow.models.joint import JointVocab, check_fits
        from mmflow.tasks.joint import JointTask
        from mmflow.tasks.joint_eval import build_eval_set

        p: JointTrainParams = ctx.params
        files, meta, dataset = _table_facts(ctx)
        vqgan_uri = ctx.inputs["vqgan"].uri if "vqgan" in ctx.inputs else meta["vqgan_uri"]
        tok_dir = materialize(meta["text_tokenizer_uri"], ctx.storage)
        with open(f"{tok_dir}/tokenizer.json", encoding="utf-8") as f:
            tokenizer_json = f.read()
        grid_h, grid_w = int(meta["grid_h"]), int(meta["grid_w"])
        cfg = p.model_config_()
        vocab = JointVocab(
            text_vocab=int(meta["text_vocab_size"]),
            codebook_size=int(meta["codebook_size"]),
            image_tokens=grid_h * grid_w,
            max_text_len=p.max_text_len or longest_text(dataset),
        )
        vocab = fitting_vocab(p, vocab, cfg.max_seq_len)
        check_fits(
            cfg,
            vocab,
            where=f"{ctx.stage}: ",
            hint=f" ({p.arch}): lower prompt_repeats "
            "or max_text_len, or raise model_cfg.max_seq_len",
        )  # before the judge trains and the workers start
        clip = _clip_plan(ctx, p)
        shards = (
            list_shards(ctx.storage, ctx.inputs["shards"].uri) if "shards" in ctx.inputs else None
        )
        threads = max(1, int(ctx.resources.cpus))
        prepare = ray.remote(build_eval_set).options(num_cpus=ctx.resources.cpus)
        eval_set, judge, seen = ray.get(
            prepare.remote(
                files, shards, tokenizer_json, holdout_fraction=p.holdout_fraction,
                max_text_len=vocab.max_text_len, image_size=int(meta.get("image_size", 32)),
                val_rows=p.val_rows, prompts=p.eval_prompts, captions=p.eval_captions,
                judge_steps=p.judge_steps, judge_train_images=p.judge_images, threads=threads,
            )
        )  # fmt: skip
        if judge:
            ctx.log_metrics(judge)
        if p.sampling.auto and not judge and clip is None:
            raise ValueError(
                f"{ctx.stage}: sampling.guidance_scale: auto needs a judge of the drawn pictures, "
                "and the shards carry no synth_shapes ground truth: wire a CLIP (the `clip` "
                "input or params.clip) or set a scale"
            )  # before the workers start
        print(f"[{ctx.stage}] {p.arch}: {cfg.num_params(vocab.size) / 1e6:.2f}M params, "
              f"sequences of {vocab.seq_len} tokens; {len(eval_set.prompts)} held-out prompts, "
              f"{len(eval_set.caption_codes)} pictures to caption; judge_acc "
              f"{judge.get('judge_acc', float('nan')):.3f}", flush=True)  # fmt: skip
        task = JointTask(
            cfg=cfg, vocab=vocab, train=p.train, i2t_share=p.i2t_share,
            cond_dropout=p.cond_dropout, shuffle_buffer=p.shuffle_buffer,
            loss_weights={"text": p.text_loss_weight, "image": p.image_loss_weight},
            sampling=p.sampling.build(), eval_set=eval_set, vqgan_uri=vqgan_uri,
            tokenizer_json=tokenizer_json, activation_checkpointing=p.activation_checkpointing,
            guidance_sweep=tuple(p.guidance_sweep), auto_guidance=p.sampling.auto,
            save_meta={"arch": p.arch, "vqgan_uri": vqgan_uri, "seen_text_ids": seen,
                       "sampling": p.sampling.saved(),
                       "token_table_fingerprint": ctx.inputs["tokens"].fingerprint},
            threads=threads, preview=p.preview,
            tracking_uri=absolute_tracking_uri(ctx.tracking_uri), run_id=ctx.run_id,
            replay_rows=_share_fits(dataset.count_rows(), ctx.resources.workers, vocab.seq_len,
                                    p.cache_mb),
            clip=clip,
        )  # fmt: skip
        datasets = {"train": training_rows(files, p.holdout_fraction)}
        final = fit(task, p.train, ctx, model_output="model", datasets=datasets)
        # the eval names already say what they are: val_text_nll, t2i_match, i2t_match ...
        ctx.log_metrics(stage_metrics(final, eval_prefix=""))
        name = p.registered_model_name
        name = f"{ctx.pipeline}-{ctx.stage}" if name is None else name
        registered = publish_model(
            ctx.outputs["model"], ctx.tracking_uri, ctx.run_id, name or None,
            "mmflow joint-stream text+image transformer", storage=ctx.storage,
        )  # fmt: skip
        ctx.record_output(
            "model", arch=p.arch, format="mmflow-joint", steps=int(final.get("step", 0)),
            vocab_size=vocab.size, seq_len=vocab.seq_len, vqgan_uri=vqgan_uri,
            load="mmflow.generate.joint.load_painter('<this folder>')", **registered,
        )  # fmt: skip
        shown = ("t2i_color_match", "t2i_match", "t2i_guidance", "t2i_match_noguide", "t2i_match_best",
                 "t2i_best_guidance", "i2t_match", "judge_acc", "t2i_clip_score",
                 "real_clip_score")  # fmt: skip
        summary = ", ".join(f"{k}={ctx.metrics[k]:.3f}" for k in shown if k in ctx.metrics)
        print(f"[{ctx.stage}] trained {int(final.get('step', 0))} steps; {summary}", flush=True)
