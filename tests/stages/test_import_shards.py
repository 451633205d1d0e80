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


def build_hostile_source(folder, sparse_claim: int = 200 << 20) -> tuple[set[str], dict]:
    """Six source tars written byte by byte, with every kind of hostile content.

    Returns (the good keys, {kind: bad keys}). ``max_member_bytes`` is 1 MiB for them."""
    import bz2
    import gzip
    import tarfile

    from tests.data.test_webdataset_io import (
        end,
        gzip_bomb,
        header,
        member,
        sample,
        sparse_member,
    )

    os.makedirs(folder)
    path = lambda i: os.path.join(folder, f"{i:05d}.tar")  # noqa: E731
    good = lambda shard, n: [f"{shard:05d}{i:04d}" for i in range(n)]  # noqa: E731
    # 00000: one of each bad member and key between good samples (a plain tar)
    parts = [
        sample("000000000", 0),
        sample("000000001", 1),
        sparse_member("000000002.jpg", sparse_claim),
        member("000000002.txt", b"sparse"),
        header("000000003.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("000000003.txt", b"symlink"),
        header("000000004.jpg", kind=tarfile.LNKTYPE, linkname="000000000.jpg"),
        member("000000004.txt", b"hardlink"),
        member("000000005.jpg", b"\xff\xd8" + b"\x00" * (3 << 20)),
        member("000000005.txt", b"too large"),
        sample("../000000006", 6),
        sample("/tmp/000000007", 7),
        sample("sub/000000008", 8),
        sample("00000\udce9009", 9),
        member("000000010.jpg", b"\xff\xd8\xff\xe0 not a jpeg at all"),
        member("000000010.txt", b"corrupt image"),
        sample("000000011", 11),
    ]
    with open(path(0), "wb") as f:
        f.write(b"".join(parts) + end())
    # 00001: a gzip bomb after three good samples
    gzip_bomb(path(1), good(1, 3), "000010003", 64 << 20, [])
    # 00002: a plain tar cut off inside the image of its third sample
    data = b"".join(sample(k, i) for i, k in enumerate(good(2, 4))) + end()
    cut = data.index(b"000020002.jpg") + 700
    with open(path(2), "wb") as f:
        f.write(data[:cut])
    # 00003: not a tar at all
    with open(path(3), "wb") as f:
        f.write(b"<html>this is not a tar</html>" * 50)
    # 00004, 00005: gzip and bzip2 tars of good samples
    for shard, pack in ((4, gzip.compress), (5, bz2.compress)):
        with open(path(shard), "wb") as f:
            f.write(pack(b"".join(sample(k, i) for i, k in enumerate(good(shard, 5))) + end()))
    keys = {"000000000", "000000001", "000000011", *good(1, 3), *good(2, 2)}
    keys |= {*good(4, 5), *good(5, 5)}
    bad = {
        "sparse_member": {"000000002"},
        "link_member": {"000000003", "000000004"},
        "member_too_large": {"000000005"},
        "unsafe_key": {"../000000006", "/tmp/000000007", "sub/000000008"},
        "non_utf8_name": {"00000\\xe9009"},
        "corrupt_image": {"000000010"},
        "compression_bomb": {"000010003"},
        "corrupt_tar": {"000020002", "00003.tar#0"},
    }
    return keys, bad


def test_hostile_tars_import_every_good_sample_once(tmp_path, write_pipeline, ray_session):
    """Acceptance: sparse members, a compression bomb, unsafe and non-UTF-8 names, links, a
    truncated and a non-tar file, a corrupt image: every good sample kept once, every bad one
    counted by kind and named, the stage done."""
    src = tmp_path / "hostile"
    good_keys, bad = build_hostile_source(str(src))
    pipe = write_pipeline(f"""
        imported:
          type: import_shards
          params: {{source: "{src}", max_member_bytes: 1048576, preview: 4}}
    """)
    r = Runner(load_pipeline(pipe))
    r.run()
    st = Storage()
    folder = os.path.join(r.uri("imported"), "shards")
    man = json.load(open(os.path.join(r.uri("imported"), "_MANIFEST.json")))
    shards = list_shards(st, folder)
    assert len(shards) == 6
    keys = [s.key for uri in shards for s in iter_shard(st, uri)]
    assert sorted(keys) == sorted(good_keys)  # each good sample exactly once
    import tarfile

    for uri in shards:  # nothing written back under an unsafe name
        with tarfile.open(uri) as t:
            assert all("/" not in n and not n.startswith(".") for n in t.getnames())
    out = man["outputs"]["shards"]
    assert {k: set(v) for k, v in out["bad_samples"].items()} == bad
    metrics = man["metrics"]
    assert metrics["num_samples"] == len(good_keys)
    assert metrics["num_bad"] == sum(len(v) for v in bad.values())
    assert {k: metrics[f"errors.{k}"] for k in bad} == {k: len(v) for k, v in bad.items()}
    assert metrics["truncated_shards"] == 3
    index = read_index(st, folder).to_pylist()
    failures = {r["key"]: r["error_message"] for r in index if r["status"] == "failed_to_import"}
    assert set(failures) == set().union(*bad.values())
    for key in ("000000002", "../000000006", "00000\\xe9009"):  # named: member and source tar
        assert str(src) in failures[key] and ".jpg" in failures[key], failures[key]


def test_hostile_import_memory_is_bounded(tmp_path):
    """The same corpus, with a sparse member claiming 64 GiB, imported shard by shard in a fresh
    process whose address space is capped at 4 GiB: it finishes, peak RSS under 1 GB."""
    import subprocess
    import sys

    src = tmp_path / "hostile"
    _, bad = build_hostile_source(str(src), sparse_claim=64 << 30)
    code = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from mmflow.data.ingest_import import ImportJob, import_shard
from mmflow.storage import Storage
sources = [f"{src}/{{i:05d}}.tar" for i in range(6)]
job = ImportJob(sources, "{tmp_path}/out", Storage(), max_member_bytes=1 << 20)
bad = sum(import_shard(i, job).get("num_bad", 0) for i in range(6))
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak over exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"bad": bad, "rss": hwm}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["bad"] == sum(map(len, bad.values())) and result["rss"] < 1 << 20, (
        result
    )  # VmHWM is in KiB


def test_unchecked_non_image_never_fails_the_stage(tmp_path, write_pipeline, ray_session, capfd):
    """With ``check_images: false`` a non-image is imported as is; the preview picture skips it
    (it used to fail the finished stage at report time, on every rerun)."""
    from tests.data.test_webdataset_io import end, member, sample

    src = tmp_path / "src"
    src.mkdir()
    html = member("000000001.jpg", b"<html>no</html>") + member("000000001.txt", b"page")
    (src / "00000.tar").write_bytes(sample("000000000", 0) + html + end())
    pipe = write_pipeline(f"""
        imported:
          type: import_shards
          params: {{source: "{src}", check_images: false, preview: 8}}
    """)
    r = Runner(load_pipeline(pipe))
    r.run()
    man = json.load(open(os.path.join(r.uri("imported"), "_MANIFEST.json")))
    assert man["outputs"]["shards"]["num_samples"] == 2
    assert "preview skips 000000001" in capfd.readouterr().err
