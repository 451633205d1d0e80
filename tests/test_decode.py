"""``mmflow decode``: token rows back to recognisable pictures through the CLI, rows or keys,
the VQ-GAN found from the table's metadata (its folder, else the MLflow registry), and
clear errors."""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmflow.data.shards import list_shards
from mmflow.data.token_table import table_files
from mmflow.data.webdataset_io import iter_shard
from mmflow.decode import decode_rows, parse_rows
from mmflow.stage import Stage, StageContext
from mmflow.storage import Storage
from tests.conftest import run_cli, run_pipeline


class TrainedVqgan(Stage):
    """A tiny VQ-GAN (16 px, f2, 64 codes) trained in the driver for 400 steps, saved and
    registered the way vqgan_train does it, without Ray Train's start-up time."""

    type = "test_decode_trained_vqgan"
    inputs = {"shards": "shards"}
    outputs = {"model": "model"}

    def run(self, ctx: StageContext) -> None:
        import tempfile

        import torch

        from mmflow.export.mlflow import publish_model
        from mmflow.models.vqgan import VQGAN, Preprocess, VQGANConfig, from_uint8, save_vqgan
        from mmflow.models.vqgan_losses import VQGANLossConfig, VQGANTraining

        cfg = VQGANConfig(image_size=16, channels=16, channel_mult=(1, 2), z_channels=32,
                          codebook_size=64, codebook_dim=4)  # fmt: skip
        pre = Preprocess(16)
        pixels = torch.stack(
            [
                pre.pixels(Image.open(io.BytesIO(s.image)))
                for uri in list_shards(ctx.storage, ctx.inputs["shards"].uri)
                for s in iter_shard(ctx.storage, uri)
            ]
        )
        torch.manual_seed(0)
        loss_cfg = VQGANLossConfig(disc_weight=0, restart_every=10, restart_until=100)
        model = VQGANTraining(VQGAN(cfg), loss_cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
        for step in range(STEPS):
            x = from_uint8(pixels[torch.randint(len(pixels), (32,))])
            loss, _ = model(x, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with tempfile.TemporaryDirectory() as tmp:
            save_vqgan(model.vqgan.eval(), tmp, "test-decode", steps=STEPS)
            ctx.storage.upload_dir(tmp, ctx.outputs["model"])
        published = publish_model(ctx.outputs["model"], ctx.tracking_uri, ctx.run_id, "dec-vq")
        ctx.record_output("model", **published)


STEPS = 400
PIPELINE = """
synth:
  type: synth_shapes
  params: {num_samples: 160, samples_per_shard: 80, image_size: 16}
vq:
  type: tests.test_decode:TrainedVqgan
  inputs: {shards: synth}
tok:
  type: pretokenize
  inputs: {shards: synth, model: vq}
  params: {vocab_size: 300, preview: 0}
"""


@pytest.fixture(scope="module")
def table(ray_session, tmp_path_factory):
    runner, runner.yaml_path = run_pipeline(tmp_path_factory.mktemp("decode"), PIPELINE, name="dec")
    return runner


def originals(runner) -> dict[str, np.ndarray]:
    folder = runner.manifest("synth")["outputs"]["shards"]["uri"]
    out = {}
    for uri in list_shards(Storage(), folder):
        for s in iter_shard(Storage(), uri):
            out[s.key] = (
                np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"), np.float64) / 255
            )
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / max(((a - b) ** 2).mean(), 1e-10)))


def test_cli_decodes_rows_into_recognisable_pngs_and_a_contact_sheet(table, tmp_path):
    uri = table.manifest("tok")["outputs"]["tokens"]["uri"]
    r = run_cli("decode", uri, "--rows", "0-7,40", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    pngs = sorted(glob.glob(str(tmp_path / "out" / "0*.png")))
    assert len(pngs) == 9 and os.path.exists(tmp_path / "out" / "contact_sheet.png")
    keys = pq.read_table(uri)["key"].to_pylist()
    truth = originals(table)
    for png in pngs:
        row, key = os.path.basename(png)[:-4].split("_", 1)
        assert keys[int(row)] == key  # row numbers are the table's, as pandas reads it
        decoded = np.asarray(Image.open(png).convert("RGB"), np.float64) / 255
        own = psnr(decoded, truth[key])
        others = [psnr(decoded, v) for k, v in truth.items() if k != key]
        assert own > 14, (key, own)
        # it is that picture, not another: clearly closer to it than to the typical other one
        assert own > np.median(others) + 3, (key, own, np.median(others))


def test_cli_finds_the_table_from_the_pipeline_yaml(table, tmp_path):
    r = run_cli("decode", table.yaml_path, "--rows", "2-4", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    keys = pq.read_table(table.manifest("tok")["outputs"]["tokens"]["uri"])["key"].to_pylist()
    pngs = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "out" / "0*.png")))
    assert pngs == [f"{row:06d}_{keys[row]}.png" for row in (2, 3, 4)]
    r = run_cli("decode", table.yaml_path, "--stage", "vq", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "has no `tokens` output" in r.stderr  # vq is a model, not a table


def test_keys_pick_the_same_rows_as_row_numbers(table):
    uri = table.manifest("tok")["outputs"]["tokens"]["uri"]
    by_row = decode_rows(uri, rows=[3, 1])
    by_key = decode_rows(uri, keys=[d.key for d in by_row])
    assert [d.row for d in by_key] == [3, 1]
    for a, b in zip(by_row, by_key, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption


def test_without_its_folder_the_vqgan_comes_from_the_registry(table, tmp_path):
    uri = table.manifest("tok")["outputs"]["tokens"]["uri"]
    moved = tmp_path / "tokens"
    moved.mkdir()
    for f in table_files(uri):
        t = pq.read_table(f)
        meta = {**t.schema.metadata, b"mmflow.vqgan_uri": str(tmp_path / "gone").encode()}
        pq.write_table(t.replace_schema_metadata(meta), moved / os.path.basename(f))
    with pytest.raises(FileNotFoundError):  # no tracking URI given: the default store lacks it
        decode_rows(str(moved), rows=[0], tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}")
    got = decode_rows(str(moved), rows=[0, 5], tracking_uri=table.p.tracking_uri)
    want = decode_rows(uri, rows=[0, 5])
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_errors_exit_2_with_a_reason(table, tmp_path):
    uri = table.manifest("tok")["outputs"]["tokens"]["uri"]
    r = run_cli("decode", uri, "--rows", "0,100000", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "out of range" in r.stderr
    r = run_cli("decode", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no Parquet files" in r.stderr
    assert parse_rows("0-2, 7") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="bad row spec"):
        parse_rows("a-b")
