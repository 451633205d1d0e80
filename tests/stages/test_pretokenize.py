"""pretokenize: the token table (columns, grid, one row per good sample, input order, bounded
files, metadata naming the VQ-GAN and the tokenizer's hash), codes and ids equal to encoding
by hand, bad images counted and listed, readers without mmflow, and a param change that
reruns only pretokenize while the VQ-GAN stays cached."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmflow.config import load_pipeline
from mmflow.data.shards import ShardWriter, sample_key
from mmflow.data.text_tokenizer import TextTokenizer
from mmflow.data.token_table import read_metadata, table_files, token_schema
from mmflow.data.webdataset_io import iter_shard
from mmflow.models.vqgan import load_vqgan
from mmflow.runner import Runner
from mmflow.stage import Resources, Stage, StageContext
from mmflow.stages.synth_shapes import SynthShapesParams, make_sample
from mmflow.storage import Storage
from tests.conftest import run_pipeline

GOOD = 12  # good samples per shard


class BadShards(Stage):
    """Two shards of GOOD synthetic samples; shard 0 also holds an undecodable image and a
    JPEG cut in half, between the good ones."""

    type = "test_pretokenize_bad_shards"
    outputs = {"shards": "shards"}
    resources = Resources(workers=0)

    def run(self, ctx: StageContext) -> None:
        p = SynthShapesParams(num_samples=2 * GOOD, image_size=16)
        for shard in (0, 1):
            with ShardWriter(ctx.storage, ctx.outputs["shards"], shard) as w:
                index = 0
                for i in range(GOOD):
                    image, truth = make_sample(0, shard * GOOD + i, p)
                    w.write({"key": sample_key(shard, index), "caption": truth["caption"]}, image)
                    index += 1
                    if shard == 0 and i == 3:
                        for broken in (b"not an image", image[: len(image) // 2]):
                            w.write({"key": sample_key(0, index), "caption": "broken"}, broken)
                            index += 1


class RandomVqgan(Stage):
    """A tiny randomly initialised VQ-GAN (16 px, f2, 32 codes), saved as vqgan_train saves one."""

    type = "test_pretokenize_random_vqgan"
    outputs = {"model": "model"}

    def run(self, ctx: StageContext) -> None:
        import tempfile

        from mmflow.models.vqgan import VQGANConfig, create_vqgan, save_vqgan

        torch.manual_seed(0)
        model, _ = create_vqgan(VQGANConfig(image_size=16, channels=8, channel_mult=(1, 2),
                                            z_channels=16, codebook_size=32, codebook_dim=4))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            save_vqgan(model, tmp, "test-tiny")
            ctx.storage.upload_dir(tmp, ctx.outputs["model"])
        ctx.record_output("model", registered_model="test-vq", registered_version=3)


PIPELINE = """
data:
  type: tests.stages.test_pretokenize:BadShards
vq:
  type: tests.stages.test_pretokenize:RandomVqgan
tok:
  type: pretokenize
  inputs: {shards: data, model: vq}
  params: {vocab_size: 300, batch_size: 5, rows_per_file: 8, preview: 4}
"""


@pytest.fixture(scope="module")
def done(ray_session, tmp_path_factory):
    return run_pipeline(tmp_path_factory.mktemp("pretokenize"), PIPELINE, name="pt")


def test_table_columns_grid_rows_and_bounded_files(done):
    runner, _ = done
    man = runner.manifest("tok")
    uri = man["outputs"]["tokens"]["uri"]
    files = table_files(uri)
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert max(sizes) <= 8 and sum(sizes) == 2 * GOOD  # one row per good sample
    table = pq.read_table(uri)
    assert table.schema.remove_metadata().equals(token_schema())
    assert all(
        len(t) == h * w
        for t, h, w in zip(
            *(table[c].to_pylist() for c in ("image_tokens", "grid_h", "grid_w")), strict=True
        )
    )
    assert set(table["grid_h"].to_pylist()) == {8} and set(table["grid_w"].to_pylist()) == {8}
    keys = table["key"].to_pylist()
    assert keys == sorted(keys)  # input order: shard, then sample
    assert man["outputs"]["tokens"]["num_rows"] == 2 * GOOD == man["metrics"]["num_rows"]


def test_bad_images_are_counted_and_listed_not_fatal(done):
    runner, _ = done
    man = runner.manifest("tok")
    assert man["metrics"]["num_bad"] == 2 and man["metrics"]["bad_undecodable_image"] == 2
    listed = man["outputs"]["tokens"]["bad_samples"]["undecodable_image"]
    assert listed == [sample_key(0, 4), sample_key(0, 5)]
    assert not set(listed) & set(pq.read_table(man["outputs"]["tokens"]["uri"])["key"].to_pylist())


def test_metadata_names_the_vqgan_and_the_tokenizer_hash(done):
    runner, _ = done
    man, vq = runner.manifest("tok"), runner.manifest("vq")
    meta = read_metadata(pq.read_schema(table_files(man["outputs"]["tokens"]["uri"])[0]))
    assert meta["vqgan_fingerprint"] == runner.fingerprints["vq"] == vq["fingerprint"]
    assert meta["vqgan_run_id"] == vq["mlflow_run_id"]
    assert meta["vqgan_uri"] == vq["outputs"]["model"]["uri"]
    assert (meta["codebook_size"], meta["grid_h"], meta["image_token_order"]) == (
        "32",
        "8",
        "row-major",
    )
    tok_dir = man["outputs"]["text_tokenizer"]["uri"]
    data = open(os.path.join(tok_dir, "tokenizer.json"), "rb").read()
    assert meta["text_tokenizer_sha256"] == hashlib.sha256(data).hexdigest()
    assert man["outputs"]["text_tokenizer"]["sha256"] == meta["text_tokenizer_sha256"]
    assert (
        meta["text_vocab_size"] == "300" and json.loads(meta["text_special_tokens"])["<|bos|>"] == 1
    )


def test_codes_and_ids_equal_encoding_by_hand(done):
    runner, _ = done
    man = runner.manifest("tok")
    table = pq.read_table(man["outputs"]["tokens"]["uri"]).to_pylist()
    rows = {r["key"]: r for r in table}
    model, preprocess, _ = load_vqgan(runner.manifest("vq")["outputs"]["model"]["uri"])
    tok = TextTokenizer.load(man["outputs"]["text_tokenizer"]["uri"])
    shards = sorted(
        f
        for f in os.listdir(runner.manifest("data")["outputs"]["shards"]["uri"])
        if f.endswith(".tar")
    )
    folder = runner.manifest("data")["outputs"]["shards"]["uri"]
    seen = same = 0
    for name in shards:
        for s in iter_shard(Storage(), os.path.join(folder, name)):
            if s.key not in rows:
                continue
            x = preprocess(Image.open(io.BytesIO(s.image)))[None]
            got, want = rows[s.key]["image_tokens"], model.tokenize(x).flatten().tolist()
            same += sum(a == b for a, b in zip(got, want, strict=True))
            assert rows[s.key]["text_ids"] == tok.encode_batch([s.caption])[0]
            assert rows[s.key]["caption"] == s.caption
            seen += 1
    assert seen == 2 * GOOD
    # batch size may change the last float bits of a convolution, and so a near tie
    assert same >= 0.99 * seen * 64


def test_readers_without_mmflow(done):
    runner, _ = done
    uri = runner.manifest("tok")["outputs"]["tokens"]["uri"]
    import pandas as pd

    df = pd.read_parquet(uri)
    assert list(df.columns) == token_schema().names and len(df) == 2 * GOOD
    assert df["key"].tolist() == pq.read_table(uri)["key"].to_pylist()  # same row numbers
    assert all(len(t) == 64 for t in df["image_tokens"]) and isinstance(
        df["text_ids"][0], np.ndarray
    )
    import duckdb

    [(n, longest)] = duckdb.sql(
        f"select count(*), max(len(image_tokens)) from read_parquet('{uri}/*.parquet')"
    ).fetchall()
    assert (n, longest) == (2 * GOOD, 64)


def test_round_trip_picture_and_tokenizer_are_logged(done):
    from mlflow import MlflowClient

    runner, _ = done
    man = runner.manifest("tok")
    client = MlflowClient(runner.p.tracking_uri)
    assert "images/round_trip.png" in {
        a.path for a in client.list_artifacts(man["mlflow_run_id"], "images")
    }
    assert "text_tokenizer/tokenizer.json" in {
        a.path for a in client.list_artifacts(man["mlflow_run_id"], "text_tokenizer")
    }


def test_a_pretokenize_param_reruns_only_pretokenize(done):
    runner, path = done
    again = Runner(load_pipeline(path, ["tok.params.vocab_size=280"]))
    report = again.run()
    assert report.executed == ["tok"] and report.cached == ["data", "vq"]
    man = again.manifest("tok")
    assert man["outputs"]["text_tokenizer"]["vocab_size"] == 280
    table = pq.read_table(man["outputs"]["tokens"]["uri"])
    assert max(max(ids) for ids in table["text_ids"].to_pylist() if ids) < 280
    before = pq.read_table(runner.manifest("tok")["outputs"]["tokens"]["uri"])
    assert table["image_tokens"].to_pylist() == before["image_tokens"].to_pylist()  # same codes
