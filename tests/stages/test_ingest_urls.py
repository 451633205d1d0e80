"""ingest_urls end to end against a loopback server: every failure kind, SIGKILL, retry_failed_from."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import tarfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmflow.config import ConfigError, load_pipeline
from mmflow.data.ingest_shard import ShardJob, ingest_shard, key_for
from mmflow.data.ingest_sources import shard_input_uri
from mmflow.data.shards import read_index
from mmflow.runner import Runner, StageFailed
from mmflow.stages.ingest_urls import IngestUrlsParams
from mmflow.storage import Storage
from tests.conftest import MMFLOW, ROOT, kill_tree, run_cli
from tests.data.http_server import LoopbackServer, jpeg

WEB = os.path.join(ROOT, "pipelines", "web.yaml")
# failure route -> (status, error kind) it must produce
FAILURES = {
    "/status/404/{i}": ("failed_to_download", "http_404"),
    "/status/500/{i}": ("failed_to_download", "http_500"),
    "/html/{i}": ("failed_to_resize", "not_image"),
    "/truncated/{i}.jpg": ("failed_to_resize", "truncated_image"),
    "/bomb/{i}.png": ("failed_to_resize", "decompression_bomb"),
    "/noai/{i}.jpg": ("failed_to_download", "opt_out"),
    "/loop/{i}": ("failed_to_download", "redirect_loop"),
    "/drip/{i}.jpg": ("failed_to_download", "timeout"),  # 60 s of one byte a second
}


@pytest.fixture
def srv():
    with LoopbackServer() as s:
        yield s


def write_list(path, urls: list[str], expect: list[str] | None = None) -> str:
    cols = {"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}
    if expect is not None:
        cols["expect"] = expect
    pq.write_table(pa.table(cols), path)
    return str(path)


def tar_keys(folder: str) -> list[str]:
    keys = []
    for tar in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(tar) as tf:  # a truncated tar raises here
            keys += [m.name[:-4] for m in tf.getmembers() if m.name.endswith(".jpg")]
    return keys


def stage_folder(tmp_path, pipeline: str = "t", stage: str = "ingest") -> str:
    [out] = [
        p for p in glob.glob(str(tmp_path / "store" / pipeline / stage / "*")) if os.path.isdir(p)
    ]
    return out


def test_cli_every_failure_kind_sigkill_rerun_each_good_image_once(tmp_path, write_pipeline, srv):
    """The acceptance run: 400 good URLs and 5 of each failure kind, timeout 3 s, through the
    real CLI; SIGKILLed once it has finished a few shards, then rerun to the end."""
    good = [srv.url(f"/img/{i}.jpg?delay=0.04") for i in range(400)]
    bad = [(srv.url(r.format(i=i)), r) for r in FAILURES for i in range(5)]
    urls, expect = list(good), ["success"] * len(good)
    for j, (url, route) in enumerate(bad):  # spread over the shards; the drips come last
        urls.insert(j * 11, url)
        expect.insert(j * 11, route)
    url_list = write_list(tmp_path / "list.parquet", urls, expect)
    pipe = write_pipeline("""
        ingest:
          type: ingest_urls
          params: {samples_per_shard: 40, image_size: 16, threads: 4, retries: 1,
                   retry_backoff: 0.1, extra_columns: [expect], preview: 8,
                   refuse_private_addresses: false}
          resources: {workers: 1}
    """)
    args = ["run", pipe, "--set", f"ingest.params.url_list={url_list}",
            "--set", "ingest.params.timeout=3"]  # fmt: skip
    proc = subprocess.Popen([*MMFLOW, *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pattern = str(tmp_path / "store" / "t" / "ingest" / "*" / "shards" / "*_stats.json")
    deadline = time.time() + 240
    while len(glob.glob(pattern)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    kill_tree(proc)
    out = stage_folder(tmp_path)
    folder = os.path.join(out, "shards")
    done_before = {p: os.stat(p).st_mtime_ns for p in glob.glob(pattern)}
    assert 3 <= len(done_before) < 11 and not os.path.exists(os.path.join(out, "_MANIFEST.json"))
    tar_keys(folder)  # every tar visible after the kill is whole

    # more threads and tasks on the rerun: neither is part of the fingerprint, so it resumes
    start = time.monotonic()
    r = run_cli(*args, "--set", "ingest.params.threads=16", "--set", "ingest.resources.workers=2",
                cwd=str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "already done" in r.stdout and stage_folder(tmp_path) == out
    for p, mtime in done_before.items():  # finished shards were not redone
        assert os.stat(p).st_mtime_ns == mtime

    keys = tar_keys(folder)
    assert len(keys) == len(set(keys)) == 400
    table = read_index(Storage(), folder)
    rows = {r["url"]: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) == 440
    assert {rows[u]["key"] for u in good} == set(keys)
    assert sorted(r["key"] for r in rows.values()) == sorted(
        key_for(s, i, 40) for s in range(11) for i in range(40)
    )
    for url, route in bad:
        status, kind = FAILURES[route]
        row = rows[url]
        assert row["status"] == status and row["error_message"].startswith(kind + ": "), row
        assert row["expect"] == route and row["key"] not in keys
    # the slow servers got timeout x (1 + retries) per run that reached them, never 60 s
    drips = [p for p in srv.hits if p.startswith("/drip/")]
    assert len(drips) == 5 and all(2 <= srv.hits[p] <= 4 for p in drips)
    assert all(srv.hits[f"/status/404/{i}"] <= 2 for i in range(5))  # never retried
    stats = [json.load(open(p)) for p in glob.glob(pattern)]
    assert max(s["duration"] for s in stats) < 20  # a drip costs 2 x 3 s, not 60 s
    assert time.monotonic() - start < 180
    man = json.load(open(os.path.join(out, "_MANIFEST.json")))
    m = man["metrics"]
    assert m["num_samples"] == 400 and m["num_rows"] == 440
    assert m["success_rate"] == pytest.approx(400 / 440)
    assert m["errors.timeout"] == m["errors.http_404"] == m["errors.opt_out"] == 5
    assert man["outputs"]["shards"]["top_errors"][0]["count"] == 5
    with tarfile.open(os.path.join(folder, "00000.tar")) as tf:  # img2dataset's members
        key = tf.getmembers()[0].name.split(".")[0]
        meta = json.load(tf.extractfile(f"{key}.json"))
        assert set(meta) >= {"url", "caption", "key", "status", "width", "sha256", "exif"}
        assert tf.extractfile(f"{key}.txt").read().decode() == meta["caption"]
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.startswith("._tmp")]
    assert leftovers == [] and not os.path.exists(os.path.join(out, "_work"))


def test_retry_failed_from_refetches_only_transient_failures(
    tmp_path, write_pipeline, srv, ray_session
):
    urls = [srv.url(f"/img/{i}.jpg") for i in range(30)]
    urls += [srv.url(f"/flaky/{i}.jpg") for i in range(8)]
    urls += [srv.url(f"/status/404/{i}") for i in range(4)]
    url_list = write_list(tmp_path / "list.parquet", urls)
    pipe = write_pipeline(f"""
        ingest:
          type: ingest_urls
          params: {{url_list: {url_list}, samples_per_shard: 16, image_size: 16, retries: 0,
                   keep_original: true, resize_mode: "no", preview: 0,
                   refuse_private_addresses: false}}
    """)
    first = Runner(load_pipeline(pipe))
    first.run()
    before = read_index(Storage(), os.path.join(first.uri("ingest"), "shards")).to_pylist()
    assert sum(r["status"] == "success" for r in before) == 30
    assert {r["error_message"].split(":")[0] for r in before if r["status"] != "success"} == {
        "http_503",
        "http_404",
    }

    srv.healed.set()
    hits = dict(srv.hits)
    previous = os.path.join(first.uri("ingest"), "shards")
    second = Runner(load_pipeline(pipe, [f"ingest.params.retry_failed_from={previous}"]))
    second.run()
    folder = os.path.join(second.uri("ingest"), "shards")
    after = {r["url"]: r for r in read_index(Storage(), folder).to_pylist()}
    assert {u: r["key"] for u, r in after.items()} == {r["url"]: r["key"] for r in before}
    assert sum(r["status"] == "success" for r in after.values()) == 38
    assert all(after[srv.url(f"/status/404/{i}")]["error_message"].startswith("http_404")
               for i in range(4))  # fmt: skip
    changed = {p: n - hits.get(p, 0) for p, n in srv.hits.items() if n != hits.get(p, 0)}
    assert changed == {f"/flaky/{i}.jpg": 1 for i in range(8)}  # nothing else was fetched
    stored = {}
    for tar in glob.glob(os.path.join(folder, "*.tar")):
        with tarfile.open(tar) as tf:
            stored |= {m.name: tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")}
    for i in range(30):  # copied bytes untouched (keep_original: the server's own bytes)
        assert stored[after[urls[i]]["key"] + ".jpg"] == jpeg(i)
    man = json.load(open(os.path.join(second.uri("ingest"), "_MANIFEST.json")))
    assert man["metrics"]["reused"] == 30
    other = [f"ingest.params.retry_failed_from={previous}", "ingest.params.image_size=32"]
    with pytest.raises(StageFailed, match="other image_size"):  # its images would not match
        Runner(load_pipeline(pipe, other)).run()


def test_threads_stay_out_of_the_fingerprint_and_url_list_is_required(tmp_path, write_pipeline):
    pipe = write_pipeline("""
        ingest:
          type: ingest_urls
          params: {url_list: /data/list.parquet}
    """)
    base = Runner(load_pipeline(pipe)).fingerprints["ingest"]
    assert Runner(load_pipeline(pipe, ["ingest.params.threads=7"])).fingerprints["ingest"] == base
    assert Runner(load_pipeline(pipe, ["ingest.params.timeout=7"])).fingerprints["ingest"] != base
    with pytest.raises(ConfigError) as e:
        load_pipeline(WEB)
    assert "url_list" in str(e.value) and "--set" in str(e.value)
    r = run_cli("status", WEB, "--storage", str(tmp_path), "--tracking-uri",
                f"sqlite:///{tmp_path}/m.db")  # fmt: skip
    assert r.returncode == 2 and "params.url_list" in r.stderr and "no URL list" in r.stderr
    load_pipeline(WEB, ["ingest.params.url_list=s3://bucket/laion/*.parquet"])


def test_a_shard_that_raises_is_retried_in_place(tmp_path):
    """A storage hiccup: the shard input appears only after the first attempt failed."""
    st, inputs, folder = Storage(), str(tmp_path / "in"), str(tmp_path / "out")
    with LoopbackServer() as s:
        table = pa.table({"url": [s.url(f"/img/{i}.jpg") for i in range(5)], "caption": ["c"] * 5})

        def appear():
            buf = io.BytesIO()
            pq.write_table(table, buf)
            st.write_atomic(shard_input_uri(inputs, 0), buf.getvalue())

        timer = threading.Timer(0.5, appear)
        timer.start()
        p = IngestUrlsParams(
            url_list="x",
            samples_per_shard=5,
            image_size=16,
            shard_retries=1,
            refuse_private_addresses=False,  # the loopback server
        )
        stats = ingest_shard(0, ShardJob(inputs, folder, None, p.shard_config(), st))
        timer.join()
    assert stats["shard_attempt"] == 2 and stats["successes"] == 5
    with pytest.raises(FileNotFoundError):  # the bound holds: no input, no endless retries
        ingest_shard(1, ShardJob(inputs, folder, None, p.shard_config(), st))


def test_bad_list_rows_are_counted_failures_of_the_shard(tmp_path):
    """A bad TSV row keeps its key and becomes a failed_to_download row naming file and line."""
    from mmflow.data.ingest_sources import ListSpec, split_url_list

    st, inputs, folder = Storage(), str(tmp_path / "in"), str(tmp_path / "out")
    with LoopbackServer() as s:
        lines = [f"{s.url(f'/img/{i}.jpg')}\tcaption {i}\n".encode() for i in range(4)]
        lines[1] = b"http://h/x.jpg\tcaf\xe9\n"
        lines[2] = b"http://h/y.jpg\ta\tb\n"
        (tmp_path / "list.tsv").write_bytes(b"".join(lines))
        spec = ListSpec(column_names=("url", "caption"))
        split_url_list(st, [str(tmp_path / "list.tsv")], spec, 4, inputs)
        p = IngestUrlsParams(
            url_list="x", samples_per_shard=4, image_size=16, refuse_private_addresses=False
        )
        stats = ingest_shard(0, ShardJob(inputs, folder, None, p.shard_config(), st))
    assert stats["successes"] == 2 and stats["error_counts"] == {"bad_row": 2}
    rows = {r["key"]: r for r in read_index(st, folder).to_pylist()}
    assert [rows[key_for(0, i, 4)]["status"] for i in range(4)] == [
        "success", "failed_to_download", "failed_to_download", "success"
    ]  # fmt: skip
    assert rows[key_for(0, 1, 4)]["error_message"].endswith(
        "list.tsv line 2: column 'caption' is not UTF-8"
    )
    assert "list.tsv line 3: 3 fields" in rows[key_for(0, 2, 4)]["error_message"]


def test_web_lists_refuse_private_addresses_by_default(tmp_path):
    """On by default: a list row pointing at loopback or cloud metadata is a counted failure
    and the server sees no request; error messages hold no body bytes."""
    st, inputs, folder = Storage(), str(tmp_path / "in"), str(tmp_path / "out")
    with LoopbackServer() as s:
        urls = [s.url("/img/0.jpg"), "http://169.254.169.254/latest/meta-data/", s.url("/html/1")]
        buf = io.BytesIO()
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * 3}), buf)
        st.write_atomic(shard_input_uri(inputs, 0), buf.getvalue())
        p = IngestUrlsParams(url_list="x", samples_per_shard=3, image_size=16, retries=0)
        assert p.refuse_private_addresses
        stats = ingest_shard(0, ShardJob(inputs, folder, None, p.shard_config(), st))
        assert stats["error_counts"] == {"private_address": 3}
        assert s.hits == {}, s.hits  # nothing reached the server
        off = IngestUrlsParams(url_list="x", samples_per_shard=3, image_size=16, retries=0,
                               allow_networks=["127.0.0.0/8"])  # fmt: skip
        stats = ingest_shard(
            0, ShardJob(inputs, str(tmp_path / "o2"), None, off.shard_config(), st)
        )
    assert stats["successes"] == 1
    rows = read_index(st, str(tmp_path / "o2")).to_pylist()
    errors = sorted(r["error_message"] for r in rows if r["error_message"])
    assert errors[0] == "not_image: HTML content, not a supported image"  # no body bytes
    assert errors[1] == "private_address: the host resolves to a non-public address (link-local)"


def _dies_after_its_stats(shard: int, folder: str, attempts: str) -> dict:
    """A shard task whose worker dies right after publishing the stats (before returning)."""
    os.makedirs(attempts, exist_ok=True)
    n = len(os.listdir(attempts)) + 1
    open(os.path.join(attempts, str(n)), "w").close()
    if n == 1:
        from mmflow.data.shards import stats_uri

        Storage().write_json(stats_uri(folder, shard), {"count": 1, "successes": 1, "attempt": 1})
        os._exit(1)
    return {"count": 1, "successes": 1, "attempt": n}  # a refetch


def test_a_task_retried_after_its_stats_returns_them(tmp_path, ray_session):
    """Ray retries the task whose worker died; the retry finds the stats and fetches nothing."""
    from mmflow.data.shards import map_shards

    folder, attempts = str(tmp_path / "out"), str(tmp_path / "attempts")
    os.makedirs(folder)
    stats = map_shards(_dies_after_its_stats, [0], folder, args=(folder, attempts), desc="t")
    assert stats == [{"count": 1, "successes": 1, "attempt": 1}]
    assert sorted(os.listdir(attempts)) == ["1"]
