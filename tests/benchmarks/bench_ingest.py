"""Benchmark: mmflow's ``ingest_urls`` against img2dataset, same URL list, server, cores and settings.

A loopback HTTP server (its own process) serves web-sized photo-like JPEGs (400 to 1024 px,
about 50 KB). Both tools download the same N URLs from it, one after the other in this run, with
the same work per image (resize to 256 px with a white border, JPEG quality 95, EXIF extraction,
a sha256, X-Robots-Tag checks), ``--processes`` worker processes of ``--threads`` threads each,
and ``--samples-per-shard`` rows per shard:

- img2dataset: ``img2dataset.download(...)`` in its own virtual environment (its pinned
  dependencies conflict with ours; created with pip at ``--img2dataset-venv`` if missing);
- mmflow: ``mmflow run`` on a one-stage pipeline, ``resources.workers = --processes``.

What is timed is each tool's own work, from the call that starts the ingest to the last shard
written, without interpreter start-up: for img2dataset the ``download()`` call, for mmflow the
stage (``duration_s`` in its manifest: reading and cutting the list, the Ray tasks, their worker
start-up and imports, metrics and the preview grid), not ``ray.init`` nor MLflow's database
set-up. Whole-command wall times are reported too (``*_wall_s``). Both then ingest 10 x N URLs:
the rates there show the steady state (``ratio_10n``; Ray's worker start-up, about 3 s, weighs
less), and mmflow's memory must not grow with the list: peak RSS is sampled every 0.1 s over the
whole process tree of each command (for mmflow: the driver, Ray's own processes and the workers),
and for mmflow's driver (which reads the list) and largest Ray worker separately.

    python tests/benchmarks/bench_ingest.py [--n 3000] [--processes 2] [--threads 32] [--repeats 1]

By default the server closes every connection after its answer, as when each URL is on another
host: img2dataset never reuses connections, and mmflow (which does, for repeated hosts) gets no
edge from it. ``--keep-alive`` lets the server keep them open. With ``--repeats R`` the two tools
run alternately R times each and the best run of each is reported (the machine may be shared).

The last line printed is one JSON object: n, mmflow_sps, img2dataset_sps, ratio (mmflow /
img2dataset), the wall-clock variants, the 10 x N rates and ratio_10n, and mmflow_peak_rss_mb_n,
mmflow_peak_rss_mb_10n, memory_ratio, with the driver and worker peaks (and img2dataset's).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]

I2D_RUN = """
import json, sys, time
from img2dataset import download
a = json.loads(sys.argv[1])
start = time.time()
download(url_list=a["list"], output_folder=a["out"], processes_count=a["processes"],
         thread_count=a["threads"], number_sample_per_shard=a["per_shard"], image_size=256,
         resize_mode="border", encode_quality=95, encode_format="jpg", output_format="webdataset",
         input_format="parquet", url_col="url", caption_col="caption", extract_exif=True,
         compute_hash="sha256", timeout=10, retries=0, distributor="multiprocessing",
         disallowed_header_directives=a["directives"], user_agent_token="img2dataset")
print("I2D_SECONDS", time.time() - start, flush=True)
"""


class PeakRSS:
    """Samples the RSS of a process tree every 0.1 s: the sum, the root, the largest Ray worker."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.total = self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    if p is not self.root and "default_worker" in " ".join(p.cmdline()):
                        self.worker = max(self.worker, rss)
                except psutil.Error:
                    continue
            with self.root.oneshot():
                self.driver = max(self.driver, self.root.memory_info().rss)
            self.total = max(self.total, total)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        mb = 1 << 20
        return {"total": self.total / mb, "driver": self.driver / mb, "worker": self.worker / mb}


def ensure_img2dataset(venv: str) -> str:
    python = os.path.join(venv, "bin", "python")
    ok = (
        os.path.exists(python)
        and subprocess.run([python, "-c", "import img2dataset"], capture_output=True).returncode
        == 0
    )
    if not ok:
        print(f"installing img2dataset into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "img2dataset"], check=True)
    return python


def start_server(keep_alive: bool) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.data.http_server", *(["--keep-alive"] if keep_alive else [])],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def write_list(path: str, base: str, n: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pad = " in the style of a long alt text scraped from a web page" * 4  # ~250 B captions
    urls = [f"{base}/photo/{i}.jpg" for i in range(n)]
    captions = [f"a photo number {i}{pad}" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path, row_group_size=10_000)
    return path


def run_img2dataset(python: str, url_list: str, out: str, a) -> dict:
    args = {
        "list": url_list,
        "out": out,
        "processes": a.processes,
        "threads": a.threads,
        "per_shard": a.samples_per_shard,
        "directives": DIRECTIVES,
    }
    start = time.monotonic()
    proc = subprocess.Popen(
        [python, "-c", I2D_RUN, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    rss = PeakRSS(proc.pid)
    output = proc.communicate()[0]
    wall = time.monotonic() - start
    peak = rss.stop()
    seconds = [float(x.split()[1]) for x in output.splitlines() if x.startswith("I2D_SECONDS")]
    if proc.returncode or not seconds:
        raise RuntimeError(f"img2dataset failed:\n{output[-3000:]}")
    return {"seconds": seconds[0], "wall": wall, "successes": count_i2d(out), "rss": peak}


def count_i2d(out: str) -> int:
    import pyarrow.parquet as pq

    return sum(
        sum(s == "success" for s in pq.read_table(p, columns=["status"])["status"].to_pylist())
        for p in glob.glob(os.path.join(out, "*.parquet"))
    )


def run_mmflow(url_list: str, work: str, a) -> dict:
    os.makedirs(work, exist_ok=True)
    pipe = os.path.join(work, "bench.yaml")
    with open(pipe, "w") as f:
        f.write(
            textwrap.dedent(f"""
            name: bench
            storage: {work}/store
            tracking_uri: sqlite:///{work}/mlflow.db
            stages:
              ingest:
                type: ingest_urls
                params:
                  url_list: {url_list}
                  samples_per_shard: {a.samples_per_shard}
                  threads: {a.threads}
                  image_size: 256
                  resize_mode: border
                  encode_quality: 95
                  extract_exif: true
                  timeout: 10
                  preview: 16
                  refuse_private_addresses: false  # the benchmark server is on loopback
                resources: {{cpus: 1, workers: {a.processes}}}
            """)
        )
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmflow.cli", "run", pipe],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rss = PeakRSS(proc.pid)
    output = proc.communicate()[0]
    wall = time.monotonic() - start
    peak = rss.stop()
    if proc.returncode:
        raise RuntimeError(f"mmflow failed:\n{output[-3000:]}")
    [manifest] = glob.glob(os.path.join(work, "store", "bench", "ingest", "*", "_MANIFEST.json"))
    man = json.load(open(manifest))
    return {
        "seconds": man["duration_s"],
        "download_s": man["metrics"]["download_s"],
        "wall": wall,
        "successes": int(man["metrics"]["num_samples"]),
        "rss": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--img2dataset-venv", default="/tmp/img2dataset-venv")
    ap.add_argument("--skip-10n", action="store_true", help="skip the 10 x N memory run")
    ap.add_argument(
        "--keep-alive",
        action="store_true",
        help="let the server keep connections open (mmflow reuses them, img2dataset does not); "
        "by default every answer closes its connection, as with many distinct hosts",
    )
    ap.add_argument("--repeats", type=int, default=1, help="alternate runs; the best of each")
    a = ap.parse_args()

    python = ensure_img2dataset(a.img2dataset_venv)
    tmp = tempfile.mkdtemp(prefix="bench-ingest-")
    server, base = start_server(a.keep_alive)
    try:
        list_n = write_list(os.path.join(tmp, "list_n.parquet"), base, a.n)
        i2ds, mms = [], []
        for r in range(a.repeats):  # alternate, so a change in the machine's load hits both
            i2ds.append(run_img2dataset(python, list_n, os.path.join(tmp, f"i2d{r}"), a))
            print(f"img2dataset: {i2ds[-1]}", flush=True)
            mms.append(run_mmflow(list_n, os.path.join(tmp, f"mm_n{r}"), a))
            print(f"mmflow N:    {mms[-1]}", flush=True)
        i2d = min(i2ds, key=lambda x: x["seconds"])
        mm = min(mms, key=lambda x: x["seconds"])
        mm10 = None
        if not a.skip_10n:
            list_10n = write_list(os.path.join(tmp, "list_10n.parquet"), base, 10 * a.n)
            i2d10 = run_img2dataset(python, list_10n, os.path.join(tmp, "i2d_10n"), a)
            print(f"img2dataset 10N: {i2d10}", flush=True)
            mm10 = run_mmflow(list_10n, os.path.join(tmp, "mm_10n"), a)
            print(f"mmflow 10N:  {mm10}", flush=True)
    finally:
        server.kill()
    result = {
        "n": a.n,
        "processes": a.processes,
        "threads": a.threads,
        "samples_per_shard": a.samples_per_shard,
        "keep_alive": a.keep_alive,
        "repeats": a.repeats,
        "mmflow_successes": mm["successes"],
        "img2dataset_successes": i2d["successes"],
        "mmflow_s": round(mm["seconds"], 2),
        "img2dataset_s": round(i2d["seconds"], 2),
        "mmflow_sps": round(mm["successes"] / mm["seconds"], 1),
        "img2dataset_sps": round(i2d["successes"] / i2d["seconds"], 1),
        "mmflow_wall_s": round(mm["wall"], 1),
        "img2dataset_wall_s": round(i2d["wall"], 1),
        "img2dataset_peak_rss_mb": round(i2d["rss"]["total"]),
        "mmflow_peak_rss_mb_n": round(mm["rss"]["total"]),
        "mmflow_driver_peak_rss_mb_n": round(mm["rss"]["driver"]),
        "mmflow_worker_peak_rss_mb_n": round(mm["rss"]["worker"]),
    }
    result["ratio"] = round(result["mmflow_sps"] / result["img2dataset_sps"], 3)
    result["ratio_wall"] = round(i2d["wall"] / mm["wall"], 3)
    if mm10:
        result.update(
            mmflow_sps_10n=round(mm10["successes"] / mm10["seconds"], 1),
            img2dataset_sps_10n=round(i2d10["successes"] / i2d10["seconds"], 1),
            img2dataset_peak_rss_mb_10n=round(i2d10["rss"]["total"]),
            mmflow_peak_rss_mb_10n=round(mm10["rss"]["total"]),
            mmflow_driver_peak_rss_mb_10n=round(mm10["rss"]["driver"]),
            mmflow_worker_peak_rss_mb_10n=round(mm10["rss"]["worker"]),
            memory_ratio=round(mm10["rss"]["total"] / mm["rss"]["total"], 3),
            driver_memory_ratio=round(mm10["rss"]["driver"] / mm["rss"]["driver"], 3),
            worker_memory_ratio=round(mm10["rss"]["worker"] / mm["rss"]["worker"], 3),
        )
        result["ratio_10n"] = round(result["mmflow_sps_10n"] / result["img2dataset_sps_10n"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
