"""The batch-inference block on real Ray: a tiny reader and model over shards written here, with
an undecodable image, a corrupt json, a key the index lists but the tar lacks, and a shard of
nothing but bad samples; bad samples counted by reason, dropped or kept as rows; input order,
bounded files, the schema's metadata, pass-through types; the per-shard record is deterministic."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmflow.data.inference import (
    MISSING_INDEX,
    BadSample,
    ModelStep,
    ReadShards,
    ShardReader,
    bad_record_uri,
    run_inference,
)
from mmflow.data.shards import sample_key
from mmflow.data.webdataset_io import Sample
from mmflow.stage import Resources
from mmflow.storage import Storage

# --- a tiny reader and model ---------------------------------------------------------------------

ROW_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.int32()), ("index", pa.int32()),
                        ("error", pa.string())])  # fmt: skip


class GreyReader(ShardReader):
    """Rows of 4x4 RGB pixels; zeros stand in for a kept bad row's."""

    def __init__(self, size: int):
        self.size = size

    def row(self, s: Sample, shard: int) -> dict:
        try:
            with Image.open(io.BytesIO(s.image)) as img:
                pixels = np.asarray(img.convert("RGB").resize((self.size, self.size)))
        except Exception as e:
            raise BadSample("undecodable_image", type(e).__name__) from e
        return {"key": s.key, "shard": shard, "index": s.index, "pixels": pixels}

    def table(self, rows: list[dict]) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        blank = np.zeros((self.size, self.size, 3), np.uint8)
        pixels = np.stack([r.get("pixels", blank) for r in rows])
        table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
        return table.append_column("pixels", ArrowTensorArray.from_numpy(pixels))


class Brightness(ModelStep):
    """Mean pixel value times ``scale``, computed on the actor's device; null for bad rows."""

    consumes = ("pixels",)

    def __init__(self, scale: float):
        self.scale = scale

    def predict(self, inputs: dict, ok: np.ndarray) -> dict:
        out = np.zeros(len(ok), np.float32)
        if ok.any():
            x = self.tensor(inputs["pixels"][ok]).float()  # (B, H, W, 3)
            out[ok] = (x.mean((1, 2, 3)) * self.scale).cpu().numpy()
        return {
            "brightness": pa.array(out, pa.float32(), mask=~ok),
            "device": pa.array([self.device] * len(ok)),
        }


# --- shards with every kind of defect ------------------------------------------------------------


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value,) * 3).save(buf, "PNG")
    return buf.getvalue()


def write_shard(folder, shard: int, members: list[tuple[str, dict[str, bytes]]], listed: list[str]):
    """A tar of ``members`` (key -> {ext: bytes}) and an index listing ``listed`` as successes."""
    with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
        for key, files in members:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = pa.table({"key": listed, "status": ["success"] * len(listed)})
    pq.write_table(index, os.path.join(folder, f"{shard:05d}.parquet"))


def value(shard: int, i: int) -> int:
    return 10 * (shard * 8 + i) + 5


def good(shard: int, i: int) -> tuple[str, dict[str, bytes]]:
    return sample_key(shard, i), {"png": png(value(shard, i)), "txt": b"grey", "json": b"{}"}


UNDECODABLE = sample_key(0, 1)
CORRUPT_JSON = sample_key(0, 3)
MISSING = sample_key(0, 9)
ALL_BAD = sample_key(2, 0)
GOOD_KEYS = [sample_key(0, i) for i in (0, 2, 4)] + [sample_key(1, i) for i in range(4)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    shard0 = [good(0, 0), (UNDECODABLE, {"png": b"not an image", "txt": b"x"}), good(0, 2),
              (CORRUPT_JSON, {"png": png(1), "txt": b"x", "json": b"{not json"}), good(0, 4)]  # fmt: skip
    write_shard(folder, 0, shard0, [k for k, _ in shard0] + [MISSING])
    shard1 = [good(1, i) for i in range(4)]
    write_shard(folder, 1, shard1, [k for k, _ in shard1])
    write_shard(folder, 2, [(ALL_BAD, {"png": b"\x89PNG broken", "txt": b"x"})], [ALL_BAD])
    return [str(folder / f"{s:05d}.tar") for s in range(3)]


def infer(shards, out, **kwargs):
    return run_inference(
        shards, Storage(), reader=GreyReader, reader_kwargs={"size": 4}, model=Brightness,
        model_kwargs={"scale": 2.0}, out_uri=str(out / "table"), bad_uri=str(out / "bad"),
        resources=Resources(cpus=0, workers=1), batch_size=2, read_workers=2, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dropped(ray_session, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dropped")
    schema = pa.schema(
        [("key", pa.string()), ("shard", pa.int32()), ("index", pa.int32()),
         ("error", pa.string()), ("brightness", pa.float32()), ("device", pa.string())],
        metadata={"mmflow.test": "yes"},
    )  # fmt: skip
    return infer(shards, out, schema=schema, rows_per_file=3, preserve_order=True), out


@pytest.fixture(scope="module")
def kept(ray_session, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("kept")
    return infer(shards, out, keep_bad_rows=True), out


# --- the tests ------------------------------------------------------------------------------------

BAD = {"undecodable_image": [UNDECODABLE, ALL_BAD], "corrupt_json": [CORRUPT_JSON],
       "missing_from_tar": [MISSING]}  # fmt: skip


def test_bad_samples_are_counted_by_reason_and_left_out(dropped):
    report, _ = dropped
    assert report.bad == {r: len(keys) for r, keys in BAD.items()}
    assert report.bad_keys == BAD
    assert report.num_bad == 4
    assert report.bad_metrics() == {"num_bad": 4, "bad_undecodable_image": 2,
                                    "bad_corrupt_json": 1, "bad_missing_from_tar": 1}  # fmt: skip
    table = pq.read_table(report.files)
    assert set(table["key"].to_pylist()) == set(GOOD_KEYS) and report.num_rows == len(GOOD_KEYS)


def test_rows_in_input_order_in_bounded_files_with_the_schema(dropped):
    report, _ = dropped
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in report.files]
    assert sizes[:-1] == [3] * (len(sizes) - 1) and sum(sizes) == len(GOOD_KEYS)
    table = pq.read_table(report.files)
    assert table["key"].to_pylist() == GOOD_KEYS  # shard, then sample
    assert pq.read_schema(report.files[0]).metadata[b"mmflow.test"] == b"yes"


def test_model_columns_replace_what_it_consumes_and_the_rest_passes_through(dropped):
    report, _ = dropped
    table = pq.read_table(report.files)
    assert table.column_names == ["key", "shard", "index", "error", "brightness", "device"]
    assert table.schema.field("shard").type == pa.int32()  # the reader's types, kept
    for row in table.to_pylist():
        want = 2.0 * value(row["shard"], row["index"])
        assert row["brightness"] == pytest.approx(want) and row["device"] == "cpu"
        assert row["key"] == sample_key(row["shard"], row["index"])


def test_kept_bad_rows_carry_their_error_and_no_prediction(kept):
    report, _ = kept
    assert report.bad_keys == BAD
    rows = {r["key"]: r for r in pq.read_table(report.files).to_pylist()}
    assert set(rows) == set(GOOD_KEYS) | {k for keys in BAD.values() for k in keys}
    assert rows[UNDECODABLE]["error"] == "undecodable_image: UnidentifiedImageError"
    assert rows[CORRUPT_JSON]["error"] == "corrupt_json"
    assert rows[MISSING]["error"] == "missing_from_tar"
    assert rows[MISSING]["index"] == MISSING_INDEX  # after everything the tar holds
    for key, row in rows.items():
        assert (row["brightness"] is None) == (key not in GOOD_KEYS)
        assert (row["error"] is None) == (key in GOOD_KEYS)


def test_a_retried_reader_rewrites_the_same_record(dropped, shards, tmp_path):
    """The record depends on the shard alone: reading it again, outside Ray, writes the same file."""
    _, out = dropped
    again = ReadShards(GreyReader, {"size": 4}, Storage(), str(tmp_path), chunk=2,
                       keep_bad_rows=False)  # fmt: skip
    batches = list(again(pa.table({"shard": [0], "uri": [shards[0]]})))
    assert sum(b.num_rows for b in batches) == 3 and [b.num_rows for b in batches] == [2, 1]
    first = open(bad_record_uri(str(out / "bad"), 0), "rb").read()
    assert open(bad_record_uri(str(tmp_path), 0), "rb").read() == first
    assert [b["key"] for b in json.loads(first)] == [UNDECODABLE, CORRUPT_JSON, MISSING]
