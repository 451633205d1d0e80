"""A pipeline submitted with jobs/submit.py to a two-node Ray cluster (two `ray start` process
groups on this machine), with storage on an S3 server (moto) and tracking on an MLflow server,
both on loopback: shard tasks and training workers spread over both nodes; a node SIGKILLed in
a shard stage and in a training stage; `ray job stop` in the middle of a run, then resubmitted.

The cluster's credentials are in its nodes' environment (as on a real cluster); the jobs carry
only the endpoint and region (see jobs/submit.py)."""

from __future__ import annotations

import glob
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest
from mlflow import MlflowClient

from mmflow.config import load_pipeline
from mmflow.plan import Plan
from mmflow.storage import Storage, join
from tests.conftest import ROOT
from tests.jobs.cluster import LocalCluster
from tests.test_storage import s3_server  # noqa: F401  (the module's moto S3 server)

pytestmark = pytest.mark.slow  # one cluster for the module, ~4 min in all

PIPELINE = "tests/jobs/cluster.yaml"  # relative: the job runs in the uploaded repository


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):  # noqa: F811
    c = LocalCluster(str(tmp_path_factory.mktemp("cluster")), s3_server)
    try:
        c.start_head(cpus=2)
        c.add_node("node_b", cpus=2)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tracking(s3_server):  # noqa: F811
    """The MLflow server as teams run it (tests/servers.py): runs in PostgreSQL, artifacts
    proxied to the S3 server (only the tracking server holds S3 keys for them). Without basic
    auth here (each node's processes would need the credentials in their environment);
    tests/infra/test_mlflow_server.py runs a pipeline through the same stack with auth on."""
    from tests.servers import mlflow_server, postgres

    env = {**s3_server, "MLFLOW_S3_ENDPOINT_URL": s3_server["AWS_ENDPOINT_URL"]}
    with postgres() as db:
        artifacts = "s3://mmflow-test/mlflow-artifacts"
        with mlflow_server(
            db.url("mlflow"), artifacts, env={**env, "PGPASSFILE": db.passfile}
        ) as s:
            yield s.url


@pytest.fixture
def two_nodes(cluster):
    """The cluster with its second node (started again after a test killed it)."""
    if "node_b" not in cluster.nodes:
        cluster.add_node("node_b", cpus=2)
    return cluster


class Job:
    """A pipeline run submitted through jobs/submit.py, on its own storage prefix."""

    def __init__(self, cluster: LocalCluster, tracking: str, name: str, *sets: str):
        self.cluster, self.tracking = cluster, tracking
        self.args = [
            PIPELINE,
            "--storage",
            f"s3://mmflow-test/{name}-{os.urandom(4).hex()}",
            "--tracking-uri",
            tracking,
            *[a for s in sets for a in ("--set", s)],
        ]
        self.plan = Plan(load_pipeline(PIPELINE, list(sets), self.args[2], tracking))

    def submit(self, *only: str, wait: bool = True) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cmd = [sys.executable, "jobs/submit.py", "--address", self.cluster.dashboard]
        proc = subprocess.Popen(
            [*cmd, *self.args, "--only", ",".join(only)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if wait:
            self.wait(proc)
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float = 400, status: int = 0) -> str:
        self.log = proc.communicate(timeout=timeout)[0]
        assert proc.returncode == status, self.log[-4000:]
        return self.log

    def finished_shards(self, stage: str, output: str = "shards") -> int:
        folder = join(self.plan.uri(stage), output)
        return sum(f.name.endswith("_stats.json") for f in Storage().ls(folder))

    def wait_until(self, proc: subprocess.Popen, what: str, done, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not done():
            assert proc.poll() is None, f"the job ended before {what}: " + proc.stdout.read()
            assert time.time() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.2)


def _keys(storage: Storage, folder: str) -> list[str]:
    """Every sample key in the folder's tar shards, repeats included."""
    keys = []
    for f in storage.ls(folder):
        if f.name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(f.uri))) as t:
                keys += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".json")]
    return keys


def _nodes_of(cluster: LocalCluster, kind: str, name: str) -> list[dict]:
    """(node name, state) of every task attempt named ``name`` / actor of class ``name``."""
    names = cluster.node_names()
    if kind == "task":
        code = (
            "from ray.util.state import list_tasks\n"
            f"result = [[t.node_id, t.state, t.attempt_number] for t in list_tasks(dashboard, "
            f"filters=[('name', '=', {name!r})], limit=10000, detail=True)]"
        )
    else:
        code = (
            "from ray.util.state import list_actors\n"
            f"result = [[a.node_id, a.state, 0] for a in "
            f"list_actors(dashboard, filters=[('class_name', '=', {name!r})], limit=10000, "
            "detail=True)]"
        )
    return [{"node": names.get(n), "state": s, "attempt": a} for n, s, a in cluster.query(code)]


def test_tasks_and_workers_spread_over_both_nodes_and_training_outlives_one(
    two_nodes,
    tracking,
):
    """Item 1 and the training half of item 2 in one run (one Ray Train start saved): the
    shard tasks and the two DDP workers run on both nodes; the worker node is SIGKILLed after
    the first complete checkpoint; the stage resumes from it on the head and ends at 40."""
    sets = ["clip_train.params.train.max_steps=40", "clip_train.params.train.checkpoint_every=4"]
    job = Job(two_nodes, tracking, "spread", *sets)
    proc = job.submit("synth", "clip_train", wait=False)
    st = Storage()

    def checkpointed() -> bool:
        root = join(job.plan.uri("clip_train"), "_work", "checkpoints")
        return any(st.exists(join(f.uri, "_COMPLETE")) for f in st.ls(root) if f.is_dir)

    job.wait_until(proc, "complete checkpoint", checkpointed, timeout=400)
    two_nodes.kill("node_b")
    job.wait(proc)
    assert "[mmflow] Ray: joined the cluster at" in job.log and "SUCCEEDED" in job.log
    assert "WARNING" not in job.log and "Traceback" not in job.log, job.log[-4000:]

    tasks = _nodes_of(two_nodes, "task", "synth-shard")
    assert len(tasks) >= 8 and {t["node"] for t in tasks} == {"head", "node_b"}, tasks
    assert len(set(_keys(st, job.plan.manifest("synth")["outputs"]["shards"]["uri"]))) == 512

    man = job.plan.manifest("clip_train")
    assert man["outputs"]["model"]["steps"] == 40
    # rank 0's last step is in the job's log before the stage's summary (its sync line)
    last = re.search(r"^\[clip_train\] 40/40 steps \(100%\)", job.log, re.M)
    summary = job.log.index("[mmflow] clip_train: committed")
    assert last and last.start() < summary, job.log[-4000:]
    resumed = re.search(r"resumed from \S+step_(\d{8}) \(step (\d+)\)", job.log)
    assert resumed and int(resumed.group(1)) == int(resumed.group(2)), job.log[-4000:]
    client = MlflowClient(tracking)
    run = client.get_run(man["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mmflow.train_restarts"] == "1"
    [restart] = client.get_metric_history(run.info.run_id, "train/restarted_at_step")
    assert restart.value == int(resumed.group(2)) and restart.value % 4 == 0
    # two worker groups: the first on both nodes (SPREAD), the restarted one on the head
    workers = _nodes_of(two_nodes, "actor", "RayTrainWorker")
    assert len(workers) == 4 and {w["node"] for w in workers} == {"head", "node_b"}, workers
    assert sorted(w["node"] for w in workers).count("node_b") == 1, workers


def test_a_node_killed_in_a_shard_stage_leaves_every_sample_exactly_once(
    two_nodes,
    tracking,
):
    job = Job(two_nodes, tracking, "shardkill")
    proc = job.submit("shapes", wait=False)
    job.wait_until(proc, "8 finished shards", lambda: job.finished_shards("shapes") >= 8)
    assert two_nodes.kill("node_b") >= 3  # ray start, raylet, agents (and its workers)
    killed_at = job.finished_shards("shapes")
    job.wait(proc)
    assert killed_at < 24, "the stage finished before the kill took effect; make it bigger"

    man = job.plan.manifest("shapes")
    keys = _keys(Storage(), man["outputs"]["shards"]["uri"])
    expected = {f"{s:05d}{i:04d}" for s in range(24) for i in range(100)}
    assert len(keys) == 2400 and set(keys) == expected  # every sample, exactly once
    assert man["metrics"]["num_samples"] == 2400
    tasks = _nodes_of(two_nodes, "task", "shapes-shard")
    on_b = [t for t in tasks if t["node"] == "node_b"]
    assert on_b and any(t["state"] == "FAILED" for t in on_b), tasks  # lost with the node
    assert any(t["attempt"] > 0 and t["node"] == "head" for t in tasks), tasks  # retried


def test_a_stopped_job_resubmitted_redoes_no_finished_stage_or_shard(
    cluster,
    tracking,
):
    """On the head alone (the tests before killed the other node)."""
    job = Job(cluster, tracking, "stop", "shapes.params.num_samples=4800")  # 48 shards
    native_logs = set(glob.glob(os.path.join(tempfile.gettempdir(), "mmflow-native-*.log")))
    proc = job.submit("synth", "shapes", wait=False)
    job_id = next(m.group(1) for line in proc.stdout if (m := re.match(r"submitted (\S+):", line)))
    job.wait_until(proc, "3 finished shapes shards", lambda: job.finished_shards("shapes") >= 3)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    stop = subprocess.run(
        [ray, "job", "stop", "--address", cluster.dashboard, job_id],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    job.wait(proc, status=1)
    assert "STOPPED" in job.log
    assert "mmflow: stopped; finished stages and shards are kept; to resume run:" in job.log
    # the stopped driver's native-output file went with it (a stop is no failure to look into)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "mmflow-native-*.log"))) <= native_logs
    assert job.plan.manifest("shapes") is None and job.plan.manifest("synth") is not None
    synth_commit = job.plan.manifest("synth")["committed_at"]
    st, folder = Storage(), join(job.plan.uri("shapes"), "shards")
    before = {f.name: st.read_json(f.uri) for f in st.ls(folder) if f.name.endswith("_stats.json")}

    job.submit("synth", "shapes")
    assert "synth: cached" in job.log
    resumed = re.search(r"resuming: (\d+) of 48 shards already done", job.log)
    assert resumed and int(resumed.group(1)) >= len(before) >= 3, job.log[-4000:]
    assert job.plan.manifest("synth")["committed_at"] == synth_commit
    for name, stats in before.items():  # not redone: each stats file is the one written before
        assert st.read_json(join(job.plan.uri("shapes"), "shards", name)) == stats
    keys = _keys(st, job.plan.manifest("shapes")["outputs"]["shards"]["uri"])
    assert len(keys) == len(set(keys)) == 4800
