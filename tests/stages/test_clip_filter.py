"""clip_filter: the filters and their combination, bad data, the score table, resharded output with
untouched bytes, metrics and pictures, cache behaviour, and open_clip's own trainer on the output."""

from __future__ import annotations

import glob
import importlib.util
import io
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmflow.config import load_pipeline
from mmflow.data.shards import ShardWriter, read_index, sample_key
from mmflow.models.clip import ClipSource, load_clip
from mmflow.runner import Runner
from mmflow.stage import Resources, Stage, StageContext
from mmflow.stages.synth_shapes import EXTRA_COLUMNS, SynthShapesParams, make_sample
from tests.conftest import run_pipeline

# --- a test-only stage: shards with every kind of defect (the random CLIP: tests/random_models.py)

ARCH = "mmflow-clip-tiny"


GOOD = 40  # good samples per shard


class BadShards(Stage):
    """Shard 0: good samples, then an undecodable image, an empty caption, a short caption and an exact
    copy of sample 0's image. Shard 1: good samples in a tar cut off part way."""

    type = "test_bad_shards"
    outputs = {"shards": "shards"}
    resources = Resources(workers=0)

    def run(self, ctx: StageContext) -> None:
        import hashlib

        p = SynthShapesParams(num_samples=2 * GOOD, mismatch_fraction=0.3)
        folder = ctx.outputs["shards"]
        for shard in (0, 1):
            with ShardWriter(ctx.storage, folder, shard, EXTRA_COLUMNS) as w:
                for i in range(GOOD):
                    image, truth = make_sample(0, shard * GOOD + i, p)
                    self.write(
                        w, sample_key(shard, i), image, truth["caption"], truth["mismatched"]
                    )
                if shard == 0:
                    first, truth = make_sample(0, 0, p)
                    self.write(w, sample_key(0, GOOD), b"not an image", "a red circle", False)
                    self.write(w, sample_key(0, GOOD + 1), first, "   ", False)
                    self.write(w, sample_key(0, GOOD + 2), first, "tiny", False)
                    self.write(
                        w, sample_key(0, GOOD + 3), first, truth["caption"] + " again", False
                    )
        tar = os.path.join(folder, "00001.tar")
        with open(tar, "r+b") as f:
            f.truncate(int(os.path.getsize(tar) * 0.6))
        self.sha = hashlib

    @staticmethod
    def write(w, key, image, caption, mismatched):
        import hashlib

        w.write(
            {
                "key": key,
                "caption": caption,
                "url": f"synth://{key}",
                "sha256": hashlib.sha256(image).hexdigest(),
                "mismatched": mismatched,
            },
            image,
            "jpg",
            extra_json={"uid": f"uid-{key}"},
        )


PIPELINE = """
bad:
  type: tests.stages.test_clip_filter:BadShards
model:
  type: tests.random_models:RandomClip
filter:
  type: clip_filter
  inputs: {shards: bad, model: model}
  params: {threshold: null, top_fraction: 0.5, dedup: true, min_caption_length: 8, samples_per_shard: 8,
           batch_size: 16, preview: 4}
"""


@pytest.fixture(scope="module")
def filtered(ray_session, tmp_path_factory):
    return run_pipeline(tmp_path_factory.mktemp("clip_filter"), PIPELINE)


def read_tar(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_bad_data_is_counted_and_listed_never_fatal(filtered):
    runner, _ = filtered
    man = runner.manifest("filter")
    scores = pq.read_table(man["outputs"]["scores"]["uri"]).to_pandas()
    # every key of the index, good or bad, is a row
    assert scores.key.is_unique and len(scores) == 2 * GOOD + 4
    errors = scores.set_index("key").error
    assert errors[sample_key(0, GOOD)].startswith("undecodable_image")
    assert errors[sample_key(0, GOOD + 1)] == "empty_caption"
    lost = scores[scores.error.fillna("").str.match("corrupt_tar|missing_from_tar")]
    assert len(lost) >= 1 and set(lost.shard) == {1}
    assert scores[scores.error.notna()].clip_score.isna().all()
    assert scores[scores.error.isna()].clip_score.notna().all()
    m = man["metrics"]
    assert m["dropped_undecodable_image"] == 1 and m["dropped_empty_caption"] == 1
    assert m.get("dropped_corrupt_tar", 0) + m.get("dropped_missing_from_tar", 0) == len(lost)
    assert sample_key(0, GOOD) in man["outputs"]["scores"]["bad_samples"]["undecodable_image"]


def test_score_table_follows_datacomp(filtered):
    runner, _ = filtered
    man = runner.manifest("filter")
    t = pq.read_table(man["outputs"]["scores"]["uri"])
    assert str(t.schema.field("clip_score").type) == "float"
    row = t.to_pandas().set_index("key").loc[sample_key(0, 3)]
    assert row.uid == f"uid-{sample_key(0, 3)}" and row.url == f"synth://{sample_key(0, 3)}"
    assert row.model == ARCH and row.model_tag == f"run:{runner.manifest('model')['mlflow_run_id']}"
    # the score is the cosine similarity of the L2-normalised embeddings, computed the plain way
    clip = load_clip(
        ClipSource(
            f"local-dir:{runner.manifest('model')['outputs']['model']['uri']}", None, ARCH, ""
        )
    )
    image, truth = make_sample(0, 3, SynthShapesParams(num_samples=2 * GOOD, mismatch_fraction=0.3))
    with torch.no_grad():
        img = clip.model.encode_image(
            clip.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None]
        )
        txt = clip.model.encode_text(clip.tokenizer([truth["caption"]]))
    want = torch.nn.functional.cosine_similarity(img, txt).item()
    assert row.clip_score == pytest.approx(want, abs=1e-4)


def test_filtered_shards_keep_the_original_bytes_and_the_layout(filtered):
    runner, _ = filtered
    man = runner.manifest("filter")
    out, src = man["outputs"]["shards"]["uri"], runner.manifest("bad")["outputs"]["shards"]["uri"]
    scores = pq.read_table(man["outputs"]["scores"]["uri"]).to_pandas()
    valid = scores[scores.error.isna() & (scores.caption.str.strip().str.len() >= 8)]
    cut = np.sort(scores.clip_score.dropna().to_numpy())[::-1][
        math.ceil(0.5 * scores.clip_score.notna().sum()) - 1
    ]
    expected = (
        valid[valid.clip_score >= cut]
        .sort_values("clip_score")
        .drop_duplicates("sha256", keep="last")
    )
    index = read_index(runner.storage, out)
    assert set(index.column("key").to_pylist()) == set(expected.key)
    tars = sorted(glob.glob(os.path.join(out, "*.tar")))
    assert len(tars) == math.ceil(len(expected) / 8) == man["outputs"]["shards"]["num_shards"]
    assert all(
        os.path.exists(t[:-4] + ".parquet") and os.path.exists(t[:-4] + "_stats.json") for t in tars
    )
    originals = read_tar(os.path.join(src, "00000.tar"))
    for tar in tars:
        members = read_tar(tar)
        assert len(members) <= 3 * 8
        for name, data in members.items():
            if name.endswith(".jpg") and name in originals:
                assert data == originals[name]  # the bytes, untouched
    assert {"mismatched", "clip_score", "true_caption"} <= set(index.column_names)


def test_metrics_and_pictures_are_logged(filtered):
    from mlflow import MlflowClient

    runner, _ = filtered
    man = runner.manifest("filter")
    for k in (
        "roc_auc",
        "kept_fraction",
        "kept_mismatch_rate",
        "clean_kept_rate",
        "top_fraction_threshold",
    ):
        assert k in man["metrics"]
    client = MlflowClient(runner.p.tracking_uri)
    names = {
        os.path.basename(a.path) for a in client.list_artifacts(man["mlflow_run_id"], "images")
    }
    assert {"score_histogram.png", "lowest_scored.png", "highest_scored.png"} <= names


def test_changing_a_filter_reruns_only_the_filter(filtered):
    runner, path = filtered
    again = Runner(load_pipeline(path, overrides=["filter.params.top_fraction=0.25"]))
    states = {s.name: s.state for s in again.status()}
    assert states == {"bad": "done", "model": "done", "filter": "stale"}  # so only filter runs


# `python -m open_clip_train.main`, with one fix: open_clip_train 3.3 cannot read any webdataset
# with webdataset >= 0.2.96, whose tar expander ends each shard with a {} marker that its
# group_by_keys_nothrow does not expect (open_clip#935, webdataset#384); this turns the marker off.
# open_clip's trainer as it ships: the lock's webdataset (0.2.86) is one it works with
OPEN_CLIP_TRAIN = """
import sys
from open_clip_train.main import main
main(sys.argv[1:])
"""


@pytest.mark.skipif(
    importlib.util.find_spec("open_clip_train") is None, reason="open_clip_train not installed"
)
def test_open_clip_trainer_reads_the_filtered_shards(filtered, tmp_path):
    runner, _ = filtered
    out = runner.manifest("filter")["outputs"]["shards"]
    model = runner.manifest("model")["outputs"]["model"]["uri"]
    urls = "::".join(os.path.join(out["uri"], s) for s in out["shards"])
    cmd = [sys.executable, "-c", OPEN_CLIP_TRAIN, "--dataset-type", "webdataset", "--train-data", urls,
           "--train-num-samples", str(out["num_samples"]), "--model", f"local-dir:{model}",
           "--batch-size", "4", "--epochs", "1", "--workers", "1", "--device", "cpu",
           "--precision", "fp32", "--lr", "1e-4", "--warmup", "1", "--save-frequency", "0",
           "--report-to", "", "--log-every-n-steps", "1", "--logs", str(tmp_path), "--name", "interop"]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Train Epoch: 0" in log, log[-3000:]
