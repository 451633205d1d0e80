"""One writer per stage output: the lease file, its renewal, expiry and take-over."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from mmflow.lease import Lease, LeaseHeld
from mmflow.storage import Storage
from tests.test_storage import s3_server  # noqa: F401  (the moto S3 fixture)


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    uri = str(tmp_path / "out" / "_LEASE.json")
    with Lease(Storage(), uri, "stage 'a'", run_id="r1", ttl=5):
        held = json.loads(open(uri).read())
        assert held["pid"] == os.getpid() and held["run_id"] == "r1"
        refused = rf"stage 'a' is being written by pid {os.getpid()}"
        with (
            pytest.raises(LeaseHeld, match=refused),
            Lease(Storage(), uri, "stage 'a'", ttl=5, wait=False),
        ):
            pass
    assert not os.path.exists(uri)  # given back
    with Lease(Storage(), uri, "stage 'a'", ttl=5, wait=False):  # free again
        pass


def test_a_waiting_writer_gets_the_lease_when_the_holder_gives_it_back(tmp_path, capsys):
    uri = str(tmp_path / "_LEASE.json")
    order: list[str] = []
    first = Lease(Storage(), uri, "stage 'a'", ttl=1.0)
    first.__enter__()

    def second():
        with Lease(Storage(), uri, "stage 'a'", ttl=1.0, poll=0.05):
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    time.sleep(1.5)  # longer than the ttl: the holder's renewals keep it live
    assert order == [] and t.is_alive()
    order.append("first done")
    first.__exit__(None, None, None)
    t.join(timeout=10)
    assert order == ["first done", "second"]
    assert "waiting for pid" in capsys.readouterr().out


def test_an_expired_lease_of_a_killed_run_is_taken_over(tmp_path):
    uri = tmp_path / "_LEASE.json"
    dead = {"token": "x", "pid": 999999, "host": "h", "since": 0, "expires_at": time.time() - 1}
    uri.write_text(json.dumps(dead))
    with Lease(Storage(), str(uri), "stage 'a'", ttl=5, wait=False) as lease:
        assert json.loads(uri.read_text())["token"] == lease.token
    uri.write_text("{half a json")  # a holder killed mid-write
    with Lease(Storage(), str(uri), "stage 'a'", ttl=5, wait=False):
        pass


def test_lease_on_s3(s3_server):  # noqa: F811
    uri = "s3://mmflow-test/lease-test/_LEASE.json"
    with (
        Lease(Storage(), uri, "stage 's3'", ttl=2),
        pytest.raises(LeaseHeld),
        Lease(Storage(), uri, "stage 's3'", ttl=2, wait=False),
    ):
        pass
    assert not Storage().exists(uri)


def test_the_lease_of_a_dead_local_process_is_taken_at_once(tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    uri = tmp_path / "_LEASE.json"
    held = {"token": "x", "pid": dead.pid, "host": socket.gethostname(), "since": 0,
            "expires_at": time.time() + 3600}  # fmt: skip
    uri.write_text(json.dumps(held))
    start = time.time()
    with Lease(Storage(), str(uri), "stage 'a'", ttl=5, wait=False):
        assert time.time() - start < 2
