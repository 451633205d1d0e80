"""``clip_filter``: score every image-text pair with CLIP on Ray Data, then filter DataComp-style.

Scoring is the batch-inference block (:mod:`mmflow.data.inference`) with two steps of its own::

    shard URIs -> read + preprocess (PairReader, CPU actors: sha256 of the original bytes,
                                     decode + the model's own transforms, tokenize;
                                     bad samples kept as rows with ``error``, not dropped)
               -> score (Scorer, actor pool: batched inference, autocast on GPU)
               -> Parquet score table (output ``scores``)

``clip_score`` is the cosine similarity of the L2-normalised image and text
embeddings (DataComp's convention, not multiplied by the logit scale). The
driver then reads back the small columns, decides what to keep, and Ray tasks
copy the kept samples, bytes untouched, into new img2dataset shards of
``samples_per_shard`` (output ``shards``; keys are kept, so rows join the table).

Filters, all combinable (a sample must pass every one that is on):

- ``threshold``: a number (keep ``clip_score >= threshold``), or ``auto``: fit a
  two-component Gaussian mixture to the scores and cut where a score becomes
  more likely to belong to the high (matching) component than to the low one,
  the Bayes boundary. Suits a model trained on the data it filters (the
  quickstart); with a pretrained CLIP on web data use a number or ``top_fraction``.
- ``top_fraction``: keep the best-scored fraction of the whole pool, one global
  cut over all shards (DataComp's ``clip_score`` top-30% baseline is 0.3).
- ``min_caption_length``: characters, after stripping whitespace.
- ``dedup``: of samples with the same image sha256, keep the best-scored.

Bad samples (undecodable image, empty caption, corrupt tar or json, listed in
the shard index but missing from the tar) are never fatal: they are rows of
the score table with ``error`` set and a null score, counted in the metrics.
With ground truth (``mismatched`` in the sample json, as synthetic data has)
the stage logs ``roc_auc``, ``kept_mismatch_rate`` and ``clean_kept_rate``.
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from mmflow.data.inference import BadSample, ModelStep, ShardReader, run_inference
from mmflow.data.pair_filters import (
    FILTER_REASONS,
    Decision,
    decide,
    evaluate,
    mixture_threshold,
    score_histogram,
)
from mmflow.data.shards import (
    BASE_COLUMNS,
    ShardWriter,
    extra_columns,
    index_rows,
    list_shards,
    map_shards,
    shard_name,
)
from mmflow.data.webdataset_io import Sample, iter_shard
from mmflow.models.clip import ClipSource, ClipSpec, resolve
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.storage import Storage, filesystem


class ClipFilterParams(Params):
    model: ClipSpec = Field(
        default_factory=ClipSpec,
        description="CLIP to score with when no `model` input is wired (arch, pretrained)",
    )
    batch_size: int = Field(256, ge=1, description="pairs per inference batch")
    preprocess_workers: int = Field(
        1, ge=1, description="CPU actors reading and preprocessing shards (1 CPU each)"
    )
    threshold: float | Literal["auto"] | None = Field(
        "auto",
        description="keep clip_score >= this; 'auto' = two-Gaussian-mixture boundary; null = off",
    )
    top_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="keep the global top fraction"
    )
    min_caption_length: int = Field(0, ge=0, description="characters after stripping")
    dedup: bool = Field(False, description="drop all but the best-scored copy of each image sha256")
    samples_per_shard: int = Field(10_000, ge=1, description="target size of the filtered shards")
    save_embeddings: bool = Field(
        False, description="add fp16 image/text embeddings to the score table"
    )
    preview: int = Field(
        16, ge=0, description="lowest- and highest-scored pairs shown in the logged grids"
    )


# the score table's own columns; the scorer adds clip_score, model, model_tag (and embeddings)
PAIR_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.int32()), ("index", pa.int32()),
                         ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                         ("sha256", pa.string()), ("error", pa.string()),
                         ("mismatched", pa.bool_())])  # fmt: skip


# --- scoring on Ray Data (mmflow.data.inference) -------------------------------------------------


class PairReader(ShardReader):
    """Pair rows: the original bytes' sha256, the image in the model's transforms, the tokens."""

    def __init__(self, source: ClipSource):
        from PIL import Image

        from mmflow.models.clip import load_transforms

        self.transform, self.tokenizer = load_transforms(source)
        # a bad row's pixels: of the real shape, so that every chunk has the same tensor type
        self.blank = np.zeros_like(self.transform(Image.new("RGB", (8, 8))).numpy())

    def row(self, s: Sample, shard: int) -> dict[str, Any]:
        if not (s.caption or "").strip():
            raise BadSample("empty_caption")
        from PIL import Image

        try:
            with Image.open(io.BytesIO(s.image)) as img:
                pixels = self.transform(img.convert("RGB")).numpy()
        except Exception as e:
            raise BadSample("undecodable_image", type(e).__name__) from e
        return {**self.bad_row(s, shard, None), "pixels": pixels}

    def bad_row(self, s: Sample, shard: int, error: str | None) -> dict[str, Any]:
        """A bad sample's row, and with ``error`` None the start of a good one."""
        mismatched = s.meta.get("mismatched")
        return {
            "key": s.key,
            "shard": shard,
            "index": s.index,
            "uid": _str(s.meta.get("uid")),
            "url": _str(s.meta.get("url")),
            "caption": s.caption,
            "error": error,
            "sha256": hashlib.sha256(s.image).hexdigest() if s.image is not None else None,
            "mismatched": mismatched if isinstance(mismatched, bool) else None,
        }

    def table(self, rows: list[dict[str, Any]]) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        stacked = np.stack([r.get("pixels", self.blank) for r in rows])  # the scorer skips blanks
        tokens = self.tokenizer([r["caption"] if r["error"] is None else "" for r in rows])
        table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
        table = table.append_column("pixels", ArrowTensorArray.from_numpy(stacked))
        return table.append_column("tokens", ArrowTensorArray.from_numpy(tokens.numpy()))


class Scorer(ModelStep):
    """CLIP on the actor's device: the cosine of the normalised embeddings, autocast on GPU."""

    consumes = ("pixels", "tokens")

    def __init__(self, source: ClipSource, save_embeddings: bool):
        from mmflow.models.clip import load_clip

        self.clip = load_clip(source, device=self.device)
        self.save_embeddings = save_embeddings

    def predict(self, inputs: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, pa.Array]:
        import torch

        n, scores, emb = len(ok), np.full(len(ok), np.nan, np.float32), None
        if ok.any():
            images, texts = self.tensor(inputs["pixels"][ok]), self.tensor(inputs["tokens"][ok])
            autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.device == "cuda")
            with torch.inference_mode(), autocast:
                img_f = self.clip.model.encode_image(images, normalize=True).float()
                txt_f = self.clip.model.encode_text(texts, normalize=True).float()
            scores[ok] = (img_f * txt_f).sum(-1).cpu().numpy()
            emb = (img_f.half().cpu().numpy(), txt_f.half().cpu().numpy())
        cols = {
            "clip_score": pa.array(scores, pa.float32(), mask=~ok),
            "model": pa.array([self.clip.arch] * n, pa.string()),
            "model_tag": pa.array([self.clip.tag] * n, pa.string()),
        }
        if self.save_embeddings:
            dim = self.clip.model.text_projection.shape[-1] if emb is None else emb[0].shape[1]
            for name, j in (("image_embedding", 0), ("text_embedding", 1)):
                full = np.zeros((n, dim), np.float16)
                if emb is not None:
                    full[ok] = emb[j]
                flat = pa.array(full.reshape(-1), pa.float16())
                cols[name] = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~ok))
        return cols


# --- writing the filtered shards -------------------------------------------------------------------


def write_filtered_shard(
    out_shard: int, folder: str, plans: list, extra: dict[str, pa.DataType], storage: Storage
) -> dict[str, Any]:
    """One output shard: the kept samples of its input shards, in order, with their original bytes."""
    import ray

    plan = ray.get(plans[out_shard])  # [(input tar uri, {key: clip_score}), ...]
    schema_names = set(BASE_COLUMNS) | set(extra)
    with ShardWriter(storage, folder, out_shard, extra) as w:
        for uri, scores in plan:
            rows, wanted = index_rows(storage, uri), set(scores)
            for s in iter_shard(storage, uri, keys=wanted):
                if s.key not in wanted:  # a corrupt tail past the kept samples
                    continue
                if s.error:  # it scored fine a moment ago: the shard changed underneath us
                    raise RuntimeError(f"{uri}: kept sample {s.key} now unreadable ({s.error})")
                wanted.discard(s.key)
                row = rows.get(s.key) or {**s.meta, "key": s.key, "caption": s.caption}
                row = {k: v for k, v in row.items() if k in schema_names}
                row["clip_score"] = scores[s.key]
                w.write(
                    row, s.image, s.image_ext, extra_json={**s.meta, "clip_score": scores[s.key]}
                )
                if not wanted:
                    break  # the rest of the shard is not needed
            if wanted:
                raise RuntimeError(f"{uri}: kept samples {sorted(wanted)[:5]} are gone")
        return w.close()


def write_filtered(
    ctx: StageContext, t: dict[str, np.ndarray], d: Decision, shards: list[str], p: ClipFilterParams
) -> list[dict[str, Any]]:
    import ray

    kept = np.nonzero(d.keep)[0]
    plans = []
    for start in range(0, len(kept), p.samples_per_shard):
        plan: dict[int, dict[str, float]] = {}
        for i in kept[start : start + p.samples_per_shard]:
            plan.setdefault(int(t["shard"][i]), {})[t["key"][i]] = float(t["clip_score"][i])
        plans.append(ray.put([(shards[s], scores) for s, scores in sorted(plan.items())]))
    extra = {**extra_columns(ctx.storage, shards), "clip_score": pa.float32()}
    folder = ctx.outputs["shards"]
    ctx.storage.makedirs(folder)
    return map_shards(
        write_filtered_shard,
        list(range(len(plans))),
        folder,
        args=(folder, plans, extra, ctx.storage),
        desc=f"{ctx.stage}-write",
        storage=ctx.storage,
    )


# --- pictures ---------------------------------------------------------------------------------------


def extremes(
    ctx: StageContext, t: dict[str, np.ndarray], d: Decision, shards: list[str], n: int
) -> dict:
    """Contact sheets of the ``n`` lowest- and highest-scored pairs, captions with score and fate."""
    from PIL import Image

    from mmflow.data.images import contact_sheet

    scored = np.nonzero(~np.isnan(t["clip_score"]))[0]
    order = scored[np.argsort(t["clip_score"][scored], kind="stable")]
    picks = {"lowest_scored": order[:n], "highest_scored": order[::-1][:n]}
    wanted = {int(i) for rows in picks.values() for i in rows}
    images: dict[int, Any] = {}
    by_shard: dict[int, dict[str, int]] = {}
    for i in wanted:
        by_shard.setdefault(int(t["shard"][i]), {})[t["key"][i]] = i
    for s, keys in by_shard.items():
        for sample in iter_shard(ctx.storage, shards[s], keys=set(keys)):
            if sample.image is not None and sample.key in keys:
                images[keys[sample.key]] = Image.open(io.BytesIO(sample.image))
    sheets = {}
    for name, rows in picks.items():
        rows = [i for i in rows if i in images]
        captions = [
            f"{t['clip_score'][i]:.3f} {'kept' if d.keep[i] else 'DROP'}"
            f"{' [MISMATCH]' if t['mismatched'][i] else ''} {t['caption'][i]}"
            for i in rows
        ]
        sheets[name] = contact_sheet([images[i] for i in rows], captions, cols=8, caption_lines=4)
    return sheets


# --- the stage -------------------------------------------------------------------------------------


@register
class ClipFilter(Stage):
    type = "clip_filter"
    version = "1"
    description = (
        "Score pairs with CLIP on Ray Data; keep the good ones as new shards (DataComp-style)."
    )
    Params = ClipFilterParams
    inputs = {"shards": "shards", "model": "model"}
    optional_inputs = frozenset({"model"})  # or name the CLIP in params.model
    outputs = {"scores": "table", "shards": "shards"}
    # per scoring actor; the preprocessing actors take inference.READ_CPUS each
    resources = Resources(cpus=1, workers=1)

    @classmethod
    def check_wiring(cls, params: ClipFilterParams, wired: set[str]) -> list[tuple[str, str]]:
        if "model" in wired and params.model.is_set:
            return [("params.model", "the CLIP is also wired as input `model`; keep one")]
        if "model" not in wired and not params.model.is_set:
            return [("inputs.model", "no CLIP: wire a clip_train output or set params.model")]
        return []

    def run(self, ctx: StageContext) -> None:
        p: ClipFilterParams = ctx.params
        model_in = ctx.inputs.get("model")  # absent when params.model names the CLIP
        run_id = model_in.manifest.get("mlflow_run_id") if model_in else None
        source = resolve(p.model, model_in.uri if model_in else None, run_id, ctx.storage)
        shards = list_shards(ctx.storage, ctx.inputs["shards"].uri)
        if not shards:
            raise ValueError(f"no .tar shards in {ctx.inputs['shards'].uri}")
        print(
            f"[{ctx.stage}] scoring {len(shards)} shards with {source.arch} ({source.tag})",
            flush=True,
        )

        start = time.monotonic()
        report = run_inference(
            shards, ctx.storage, reader=PairReader, reader_kwargs={"source": source},
            model=Scorer, model_kwargs={"source": source, "save_embeddings": p.save_embeddings},
            out_uri=ctx.outputs["scores"], bad_uri=ctx.work("bad"), resources=ctx.resources,
            batch_size=p.batch_size, read_workers=p.preprocess_workers, keep_bad_rows=True,
            desc=ctx.stage,
        )  # fmt: skip
        t = _read_scores(ctx.outputs["scores"])
        scored = time.monotonic()
        d = decide(t, p)
        stats = write_filtered(ctx, t, d, shards, p)
        written = time.monotonic()

        n, kept = len(d.keep), int(d.keep.sum())
        dropped = {f"dropped_{r}": d.reasons.get(r, 0) for r in (*FILTER_REASONS, *d.reasons)}
        timing = {"score_s": scored - start, "write_s": written - scored}
        metrics = {"num_samples": n, "num_kept": kept, **d.thresholds, **dropped, **timing}
        ctx.log_metrics({**metrics, **evaluate(t, d)})
        ctx.record_output("scores", num_rows=n, model=source.arch, model_tag=source.tag,
                          bad_samples=report.bad_keys)  # fmt: skip
        ctx.record_output("shards", num_samples=kept, num_shards=len(stats), format="img2dataset",
                          shards=[f"{shard_name(i)}.tar" for i in range(len(stats))])  # fmt: skip
        if n and (~np.isnan(t["clip_score"])).any():
            ctx.log_image(score_histogram(t, d), "score_histogram")
            for name, sheet in extremes(ctx, t, d, shards, p.preview).items():
                ctx.log_image(sheet, name)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in {**d.thresholds, **evaluate(t, d)}.items())
        print(f"[{ctx.stage}] scored {n} pairs in {timing['score_s']:.0f}s, kept {kept} "
              f"({len(stats)} shards, {timing['write_s']:.0f}s); {summary}", flush=True)  # fmt: skip


# --- small helpers ------------------------------------------------------------------------------------


def _read_scores(uri: str) -> dict[str, np.ndarray]:
    """The columns the decision needs, sorted into shard order."""
    fs, path = filesystem(uri)
    cols = ["key", "shard", "index", "caption", "sha256", "error", "mismatched", "clip_score"]
    table = pq.read_table(path, filesystem=fs, columns=cols).sort_by(
        [("shard", "ascending"), ("index", "ascending")]
    )
    t = {c: np.array(table[c].to_pylist(), dtype=object) for c in cols if c != "clip_score"}
    t["shard"] = t["shard"].astype(np.int64)
    scores = table["clip_score"].to_numpy(zero_copy_only=False)  # null -> nan
    t["clip_score"] = scores.astype(np.float32)
    return t


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


__all__ = ["ClipFilter", "ClipFilterParams", "decide", "evaluate", "mixture_threshold"]
