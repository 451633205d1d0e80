"""import_shards: img2dataset's own layout in, checked img2dataset-layout shards out, bad samples named."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmflow.config import load_pipeline
from mmflow.data.shards import list_shards, read_index
from mmflow.data.webdataset_io import iter_shard
from mmflow.runner import Runner
from mmflow.storage import Storage


def jpg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), (i * 20 % 256, 80, 160)).save(buf, "JPEG")
    return buf.getvalue()


def meta(key: str, i: int, status: str = "success", error: str | None = None) -> dict:
    """A row / sample json as img2dataset writes them (its columns, plus a kept ``uid``)."""
    ok = status == "success"
    return {
        "url": f"http://example.com/{key}.jpg",
        "caption": f"caption {key}",
        "key": key,
        "status": status,
        "error_message": error,
        "width": 20 if ok else None,
        "height": 16 if ok else None,
        "original_width": 640 if ok else None,
        "original_height": 512 if ok else None,
        "exif": "{}" if ok else None,
        "sha256": hashlib.sha256(jpg(i)).hexdigest() if ok else None,
        "uid": f"uid-{key}",
    }


def write_img2dataset_shard(folder, shard: int, samples: list[dict], rows: list[dict] | None):
    """``samples``: {key, members} as they go in the tar; ``rows``: the parquet (None: no index)."""
    import webdataset as wds

    with open(os.path.join(folder, f"{shard:05d}.tar"), "wb") as f:
        tw = wds.TarWriter(f, encoder=False)
        for s in samples:
            tw.write({"__key__": s["key"], **s["members"]})
        tw.close()
    if rows is not None:
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"{shard:05d}.parquet"))
    stats = {"count": len(rows or samples), "successes": len(samples), "status_dict": {}}
    with open(os.path.join(folder, f"{shard:05d}_stats.json"), "w") as f:
        json.dump(stats, f)


def good(shard: int, i: int) -> tuple[dict, dict]:
    key = f"{shard:05d}{i:04d}"
    m = meta(key, i)
    members = {"jpg": jpg(i), "txt": m["caption"].encode(), "json": json.dumps(m).encode()}
    return {"key": key, "members": members}, m


def build_source(folder) -> dict[str, set[str]]:
    """Three shards as img2dataset lays them out, with every kind of damage; returns bad keys."""
    os.makedirs(folder)
    # 00000: whole, plus img2dataset's own failure rows in its index
    samples, rows = zip(*(good(0, i) for i in range(6)), strict=True)
    fails = [meta(f"00000{i:04d}", i, "failed_to_download", "HTTP Error 404") for i in (6, 7)]
    write_img2dataset_shard(folder, 0, list(samples), [*rows, *fails])
    # 00001: damaged samples, and an index row whose sample is not in the tar
    samples, rows = map(list, zip(*(good(1, i) for i in range(8)), strict=True))
    del samples[1]["members"]["jpg"]  # missing image
    del samples[2]["members"]["txt"]  # missing caption
    samples[3]["members"]["jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"  # undecodable
    samples[4]["members"]["json"] = b"{broken"  # corrupt json
    samples.append(samples[0])  # a key written twice
    lost = samples.pop(5)  # listed in the index, absent from the tar
    write_img2dataset_shard(folder, 1, samples, rows)
    # 00002: no parquet index, and the tar is cut off in the middle of its fourth sample
    samples, _ = zip(*(good(2, i) for i in range(6)), strict=True)
    write_img2dataset_shard(folder, 2, list(samples), None)
    path = os.path.join(folder, "00002.tar")
    data = open(path, "rb").read()
    cut = data.index(b"000020003.jpg") + 700
    open(path, "wb").write(data[:cut])
    return {
        "missing_image": {"000010001"},
        "missing_caption": {"000010002"},
        "corrupt_image": {"000010003"},
        "corrupt_json": {"000010004"},
        "duplicate_key": {"000010000"},
        "missing_from_tar": {lost["key"]},
        "corrupt_tar": {"000020003"},
    }


def test_img2dataset_shards_import_checked_and_readable(tmp_path, write_pipeline, ray_session):
    src = tmp_path / "laion"
    bad = build_source(str(src))
    pipe = write_pipeline(f"""
        imported:
          type: import_shards
          params: {{source: "{src}/{{00000..00003}}.tar", preview: 4}}
    """)
    r = Runner(load_pipeline(pipe))
    r.run()
    folder = os.path.join(r.uri("imported"), "shards")
    st = Storage()

    shards = list_shards(st, folder)
    assert [os.path.basename(s) for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = [s for uri in shards for s in iter_shard(st, uri)]
    assert all(s.error is None and s.caption for s in samples)
    keys = [s.key for s in samples]
    whole = [f"00000{i:04d}" for i in range(6)] + ["000010000", "000010006", "000010007"]
    assert sorted(keys) == sorted(whole + [f"00002{i:04d}" for i in range(3)])
    by_key = {s.key: s for s in samples}
    assert by_key["000000002"].image == jpg(2)  # bytes untouched
    assert by_key["000000002"].meta["uid"] == "uid-000000002"

    index = {(r["key"], r["status"]): r for r in read_index(st, folder).to_pylist()}
    assert index[("000000006", "failed_to_download")]["error_message"] == "HTTP Error 404"
    assert index[("000000001", "success")]["uid"] == "uid-000000001"
    assert index[("000020000", "success")]["url"] == "http://example.com/000020000.jpg"
    for kind, ks in bad.items():
        for k in ks:
            row = index[(k, "failed_to_import")]
            assert row["error_message"].startswith(kind + ":"), row

    man = json.load(open(os.path.join(r.uri("imported"), "_MANIFEST.json")))
    out = man["outputs"]["shards"]
    assert {k: set(v) for k, v in out["bad_samples"].items()} == bad
    assert out["num_samples"] == len(keys) and out["missing_shards"][0].endswith("00003.tar")
    assert man["metrics"]["truncated_shards"] == 1 and man["metrics"]["unindexed_shards"] == 1
    assert man["metrics"]["num_bad"] == 7 and man["metrics"]["errors.corrupt_image"] == 1
