"""``pretokenize``: images -> VQ-GAN codes and captions -> BPE ids, into one Parquet table.

First the caption tokenizer: byte-level BPE trained on the input's captions (read
from the shards' parquet indexes, or the tars when there are none) in one Ray task,
or loaded from ``text_tokenizer``; it is the output ``text_tokenizer`` (a folder
``tokenizers.Tokenizer.from_file`` reads) and its sha256 is recorded. It lives here,
not in ``vqgan_train``, so a new vocabulary reruns this stage and never the VQ-GAN.

Then the batch-inference block (:mod:`mmflow.data.inference`) with two steps of its own::

    shard URIs -> read (ImageTextReader, CPU actors: decode + the VQ-GAN's preprocessing to
                        uint8, captions -> ids; a bad sample is noted in _work/bad/, not passed on)
               -> encode (Encoder, actor pool, GPU actors when resources.gpus: the VQ-GAN encoder)
               -> Parquet files of at most ``rows_per_file`` rows (output ``tokens``)

Columns: ``key``, ``caption``, ``text_ids`` (list<int32>), ``image_tokens`` (list<int32>,
row-major over the grid), ``grid_h``, ``grid_w``. Every file's key-value metadata
(:data:`META_PREFIX` keys) names the VQ-GAN (storage URI, stage fingerprint, MLflow run,
registered model), its codebook size and the text tokenizer's hash, so
``mmflow decode`` and any reader (pyarrow, pandas, duckdb) need nothing else.
Rows are in input order (shard, then sample). Bad samples (undecodable image, broken
tar or json, missing image, listed in the shard index but missing from the tar) are
counted by reason in the metrics and listed in the manifest, never fatal.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from mmflow.data.inference import BadSample, ModelStep, ShardReader, run_inference
from mmflow.data.shards import list_shards
from mmflow.data.token_table import token_schema
from mmflow.data.webdataset_io import Sample, iter_shard
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.storage import Storage, join


class PretokenizeParams(Params):
    vocab_size: int = Field(
        4096, ge=260, description="BPE vocabulary (256 bytes + 3 specials + merges)"
    )
    min_frequency: int = Field(2, ge=1, description="BPE: a pair is merged only this often")
    text_tokenizer: str | None = Field(
        None, description="a tokenizer.json (or its folder) to use instead of training one"
    )
    batch_size: int = Field(256, ge=1, description="images per encoder batch")
    read_workers: int = Field(
        1, ge=1, description="CPU actors reading and decoding shards (1 CPU each)"
    )
    rows_per_file: int = Field(100_000, ge=1, description="at most this many rows per Parquet file")
    preview: int = Field(16, ge=0, description="rows decoded back into the logged round-trip sheet")

    @model_validator(mode="after")
    def _check(self) -> PretokenizeParams:
        if self.text_tokenizer is not None and not self.text_tokenizer.strip():
            raise ValueError("text_tokenizer must be a path, or null to train one")
        return self


# --- the caption tokenizer ------------------------------------------------------------------------


def _captions(storage: Storage, shards: list[str]) -> Iterator[str]:
    """Every sample's caption in shard order: from the parquet index when a shard has one."""
    for tar in shards:
        index = tar[: -len(".tar")] + ".parquet"
        if storage.exists(index):
            with storage.open_input(index) as f:
                t = pq.read_table(f, columns=["caption", "status"])
            for c, s in zip(t["caption"].to_pylist(), t["status"].to_pylist(), strict=True):
                if s == "success":
                    yield c or ""
        else:
            yield from ((s.caption or "") for s in iter_shard(storage, tar) if not s.error)


def build_text_tokenizer(
    p: PretokenizeParams, shards: list[str], out_uri: str, storage: Storage
) -> dict:
    """Train (or load) the tokenizer, write its folder to ``out_uri``; returns its meta and JSON."""
    import tempfile

    from mmflow.data.text_tokenizer import TextTokenizer
    from mmflow.io.cache import materialize

    if p.text_tokenizer:
        tok = TextTokenizer.load(materialize(p.text_tokenizer, storage))
    else:
        tok = TextTokenizer.train(_captions(storage, shards), p.vocab_size, p.min_frequency)
    with tempfile.TemporaryDirectory(prefix="mmflow-tok-") as tmp:
        meta = tok.save(tmp)
        storage.upload_dir(tmp, out_uri)
    return {"meta": meta, "json": tok.tokenizer.to_str()}


# --- encoding on Ray Data (mmflow.data.inference) -------------------------------------------------


class ImageTextReader(ShardReader):
    """Rows of uint8 pixels in the VQ-GAN's preprocessing and caption ids."""

    def __init__(self, image_size: int, tokenizer_json: str):
        from tokenizers import Tokenizer

        from mmflow.data.text_tokenizer import TextTokenizer
        from mmflow.models.vqgan import Preprocess

        self.preprocess = Preprocess(image_size)
        self.tokenizer = TextTokenizer(Tokenizer.from_str(tokenizer_json), "stage")

    def row(self, s: Sample, shard: int) -> dict[str, Any]:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(s.image)) as img:
                pixels = self.preprocess.pixels(img).numpy()
        except Exception as e:
            raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from e
        return {"key": s.key, "caption": s.caption or "", "pixels": pixels}

    def table(self, rows: list[dict[str, Any]]) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        captions = [r["caption"] for r in rows]
        return pa.table(
            {
                "key": pa.array([r["key"] for r in rows], pa.string()),
                "caption": pa.array(captions, pa.string()),
                "text_ids": pa.array(self.tokenizer.encode_batch(captions), pa.list_(pa.int32())),
                "pixels": ArrowTensorArray.from_numpy(np.stack([r["pixels"] for r in rows])),
            }
        )


class Encoder(ModelStep):
    """The VQ-GAN on the actor's device: uint8 pixels in, row-major codes out."""

    consumes = ("pixels",)

    def __init__(self, model_uri: str):
        from mmflow.io.cache import materialize
        from mmflow.models.vqgan import load_vqgan

        self.model, _, _ = load_vqgan(materialize(model_uri), self.device)

    def predict(self, inputs: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, pa.Array]:
        import torch

        from mmflow.models.vqgan import from_uint8

        with torch.inference_mode():
            tokens = self.model.tokenize(from_uint8(self.tensor(inputs["pixels"])))  # (B, h, w)
        n, h, w = tokens.shape
        flat = tokens.reshape(n, h * w).to(torch.int32).cpu().numpy()
        return {
            "image_tokens": pa.FixedSizeListArray.from_arrays(
                pa.array(flat.reshape(-1)), h * w
            ).cast(pa.list_(pa.int32())),
            "grid_h": pa.array(np.full(n, h, np.int32)),
            "grid_w": pa.array(np.full(n, w, np.int32)),
        }


# --- the stage ----------------------------------------------------------------------------------------


@register
class Pretokenize(Stage):
    type = "pretokenize"
    version = "1"
    description = (
        "Encode images with a VQ-GAN and captions with BPE into a Parquet token table, "
        "rows in input order (Ray Data)."
    )
    Params = PretokenizeParams
    inputs = {"shards": "shards", "model": "model"}
    outputs = {"tokens": "table", "text_tokenizer": "tokenizer"}
    # per encoding actor; the reading actors take inference.READ_CPUS each
    resources = Resources(cpus=1, workers=1)

    def run(self, ctx: StageContext) -> None:
        import ray

        from mmflow.io.cache import materialize

        p: PretokenizeParams = ctx.params
        model_in = ctx.inputs["model"]
        vq = ctx.storage.read_json(join(model_in.uri, "vqgan.json"))
        cfg = vq["config"]
        factor = 2 ** (len(cfg["channel_mult"]) - 1)
        grid = cfg["image_size"] // factor
        shards = list_shards(ctx.storage, ctx.inputs["shards"].uri)
        if not shards:
            raise ValueError(f"no .tar shards in {ctx.inputs['shards'].uri}")

        start = time.monotonic()
        build = ray.remote(build_text_tokenizer).options(num_cpus=1)
        tok = ray.get(build.remote(p, shards, ctx.outputs["text_tokenizer"], ctx.storage))
        tok_meta = tok["meta"]
        tokenized = time.monotonic()
        info = model_in.info
        metadata = {
            "format": "mmflow-tokens/1",
            "vqgan_uri": model_in.uri,
            "vqgan_fingerprint": model_in.fingerprint,
            "vqgan_run_id": model_in.manifest.get("mlflow_run_id"),
            "vqgan_stage": model_in.stage,
            "vqgan_arch": vq.get("arch"),
            "vqgan_registered_model": info.get("registered_model"),
            "vqgan_registered_version": info.get("registered_version"),
            "codebook_size": cfg["codebook_size"],
            "grid_h": grid,
            "grid_w": grid,
            "image_size": cfg["image_size"],
            "image_token_order": "row-major",
            "text_tokenizer_sha256": tok_meta["sha256"],
            "text_tokenizer_uri": ctx.outputs["text_tokenizer"],
            "text_vocab_size": tok_meta["vocab_size"],
            "text_special_tokens": json.dumps(tok_meta["special_tokens"], sort_keys=True),
        }
        print(f"[{ctx.stage}] {len(shards)} shards -> {vq.get('arch')} codes ({grid}x{grid} of "
              f"{cfg['codebook_size']}), BPE of {tok_meta['vocab_size']} ({tok_meta['source']})", flush=True)  # fmt: skip
        # rows in input order (preserve_order): row numbers mean something
        report = run_inference(
            shards, ctx.storage, reader=ImageTextReader,
            reader_kwargs={"image_size": cfg["image_size"], "tokenizer_json": tok["json"]},
            model=Encoder, model_kwargs={"model_uri": model_in.uri}, out_uri=ctx.outputs["tokens"],
            bad_uri=ctx.work("bad"), resources=ctx.resources, batch_size=p.batch_size,
            read_workers=p.read_workers, schema=token_schema(metadata),
            rows_per_file=p.rows_per_file, preserve_order=True, desc=ctx.stage,
        )  # fmt: skip
        encoded = time.monotonic()

        rows, files = report.num_rows, report.files
        timing = {"tokenizer_s": tokenized - start, "encode_s": encoded - tokenized}
        ctx.log_metrics({"num_rows": rows, **report.bad_metrics(),
                         "rows_per_s": rows / max(timing["encode_s"], 1e-9), **timing})  # fmt: skip
        ctx.record_output("tokens", num_rows=rows, num_files=len(files), format="parquet",
                          columns=token_schema().names, bad_samples=report.bad_keys,
                          **{k: v for k, v in metadata.items() if k != "format"})  # fmt: skip
        ctx.record_output("text_tokenizer", **tok_meta, file="tokenizer.json")
        ctx.log_artifact(materialize(ctx.outputs["text_tokenizer"], ctx.storage), None)
        if p.preview and rows:
            sheet = ray.get(
                ray.remote(_preview).options(num_cpus=1).remote(ctx.outputs["tokens"], p.preview)
            )
            ctx.log_image(sheet, "round_trip")
        print(f"[{ctx.stage}] {rows} rows in {len(files)} files ({timing['encode_s']:.0f}s), "
              f"{report.num_bad} bad samples {dict(report.bad) or ''}", flush=True)  # fmt: skip


def _preview(tokens_uri: str, n: int):
    """The first ``n`` rows decoded back to pictures, captions under them (a Ray task)."""
    from mmflow.decode import contact_sheet_of, decode_rows

    return contact_sheet_of(decode_rows(tokens_uri, rows=list(range(n))))
