"""A real multi-node Ray cluster on this machine: one ``ray start --head`` process and
``ray start --address=...`` worker nodes, each with its own CPUs, custom resource and
process group, so a test can SIGKILL one node's Ray processes (raylet, agents, workers)
as a machine failure would."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import psutil

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# The head notices a dead node in ~3 s instead of Ray's ~30 s (health checks every 1 s).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """The processes one ``ray start`` left running: a node of the cluster. ``ray start`` runs
    in a process group of its own, which the node's processes keep (Ray starts them without a
    new session); the workers are their descendants. Not ``--block``: that would stop the
    whole node whenever one of its helper processes exits (on a loaded machine the head's Ray
    Client server may give up waiting for its raylet)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: str):
        self.name = name
        self.log = log
        cmd = [RAY, "start", "--disable-usage-stats", *args]
        # Ray gives a raylet 30 s to register with the GCS; a loaded machine can miss that:
        # the failed start's processes are killed and the node started again.
        for _ in range(3):
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
                self.pgid = proc.pid
                rc = proc.wait(timeout=300)
            if rc == 0:
                return
            self.kill()
        with open(log) as f:
            raise AssertionError(f"ray start for node {name} failed 3 times:\n{f.read()[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(p.pid) == self.pgid:
                    for q in [p, *p.children(recursive=True)]:
                        found[q.pid] = q
        return list(found.values())

    def kill(self) -> int:
        """SIGKILL every Ray process of this node at once (as a machine dying would); returns
        how many."""
        family = self.processes()
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=30)
        return len(family)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL for what is still there after 5 s (some of Ray's helpers sit
        out a SIGTERM for 20 s; a node being torn down has nothing left to finish)."""
        family = self.processes()
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(family, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


class LocalCluster:
    """A head node and worker nodes, each a ``ray start`` process group with its own
    ``--num-cpus`` and a custom resource named after it ({"head": 1}, {"node_b": 1})."""

    def __init__(self, folder: str, env: dict[str, str], fast_failure: bool = True):
        """``fast_failure``: the head declares a node dead after 3 s of missed health checks
        (for the tests that kill nodes); without it Ray's own, lenient, settings."""
        self.folder, self.nodes = folder, {}
        # Like provisioned nodes: the locked environment is first on PATH, so jobs' `python`
        # is it; the cluster's own settings (credentials included) are in the nodes' env.
        self.env = {
            **os.environ,
            **env,
            **(FAST_FAILURE_DETECTION if fast_failure else {}),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        }
        self.env.pop("RAY_ADDRESS", None)
        if os.path.exists(os.path.expanduser("~/.ray/auth_token")):
            self.env.setdefault("RAY_AUTH_MODE", "token")  # as the head started by `ray start`
        # short: Ray's socket paths under it must stay within 107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="mmf-ray-", dir="/tmp")
        self.gcs = self.dashboard = ""

    def _node_args(self, name: str, cpus: int) -> list[str]:
        return [
            "--num-cpus",
            str(cpus),
            "--resources",
            json.dumps({name: 1}),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            # one per node, as on separate machines: a node's runtime-env agent manages the
            # working directories it unpacked under it (a shared one would delete the head's
            # job directory under its running driver when its own tasks are done with it)
            "--temp-dir",
            os.path.join(self.temp_dir, name),
        ]

    def start_head(self, cpus: int) -> None:
        port, dash = free_port(), free_port()
        args = [
            "--head",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--ray-client-server-port",
            str(free_port()),
            *self._node_args("head", cpus),
        ]
        self.nodes["head"] = Node("head", args, self.env, os.path.join(self.folder, "head.log"))
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 before a token is sent): the dashboard is up
            except OSError:
                assert time.time() < deadline, "the Ray dashboard did not come up in 180 s"
                time.sleep(1)
        self.wait_nodes({"head"})

    def add_node(self, name: str, cpus: int) -> Node:
        args = ["--address", self.gcs, *self._node_args(name, cpus)]
        node = Node(name, args, self.env, os.path.join(self.folder, f"{name}.log"))
        self.nodes[name] = node
        self.wait_nodes(set(self.alive_names()) | {name})
        return node

    def kill(self, name: str) -> int:
        return self.nodes.pop(name).kill()

    def query(self, code: str) -> Any:
        """What ``code`` (Python that binds ``result``; ``dashboard`` is the dashboard's
        address) computes from the cluster's state API, in a process of its own: the test
        process may hold another Ray (the suite's session fixture)."""
        script = f"import json, sys\ndashboard = sys.argv[1]\n{code}\nprint(json.dumps(result))"
        out = subprocess.run(
            [sys.executable, "-c", script, self.dashboard],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def node_names(self) -> dict[str, str]:
        """node id -> name (the node's custom resource), every node the cluster has known."""
        return self.query(
            "from ray.util.state import list_nodes\n"
            "result = {n.node_id: [r for r in n.resources_total if r == 'head' "
            "or r.startswith('node_')][0] for n in list_nodes(dashboard, detail=True)}"
        )

    def alive_names(self) -> list[str]:
        """The names of the cluster's live nodes (the GCS's view)."""
        return self.query(
            "from ray.util.state import list_nodes\n"
            "result = sorted(r for n in list_nodes(dashboard, detail=True) if n.state == 'ALIVE' "
            "for r in n.resources_total if r == 'head' or r.startswith('node_'))"
        )

    def wait_nodes(self, names: set[str], timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while set(self.alive_names()) != names:
            assert time.time() < deadline, f"nodes {sorted(names)} not up: {self.alive_names()}"
            time.sleep(1)

    def tail(self, name: str) -> str:
        with open(os.path.join(self.folder, f"{name}.log")) as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        for name in list(self.nodes)[::-1]:
            self.nodes.pop(name).stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
