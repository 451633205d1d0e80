"""One writer per stage output: a lease file beside the output, renewed while its holder lives.

``{storage}/{pipeline}/{stage}/{fingerprint}/_LEASE.json`` holds who writes that output
(host, pid, run, since) and until when the lease is good. The holder renews it every
``ttl / 4`` seconds from a thread; a second writer waits while the lease is live, saying
once who holds it, and takes it over when it has expired (its holder was killed), at once
when the holder was a process of this machine that is gone, or refuses at once with
``wait=False``.

Taking a free lease is exclusive on a local disk (``O_CREAT | O_EXCL``). S3 offers no
conditional put through pyarrow, so there a writer puts its token, waits a moment and
reads it back: of writers racing for a free lease, the last one to write keeps it and
the others see a foreign token and wait. Hand-written because nothing in the locked
environment offers a lease over both a local disk and S3.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from mmflow.storage import Storage, filesystem, is_remote, normalize

LEASE = "_LEASE.json"


def default_ttl() -> float:
    return float(os.environ.get("MMFLOW_LEASE_TTL", "60"))


class LeaseHeld(RuntimeError):
    """Another live writer holds the output."""


class Lease:
    def __init__(
        self,
        storage: Storage,
        uri: str,
        what: str,
        run_id: str | None = None,
        ttl: float | None = None,
        wait: bool = True,
        poll: float | None = None,
    ):
        self.storage, self.uri, self.what = storage, normalize(uri), what
        self.ttl = ttl or default_ttl()
        self.poll = poll or min(2.0, self.ttl / 4)
        self.wait = wait
        self.token = uuid.uuid4().hex
        self.record = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run_id": run_id,
            "since": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # --- taking and giving back ---------------------------------------------------------------
    def __enter__(self) -> Lease:
        told = False
        while not self._try_take():
            held = self._read()
            if held is not None and (held.get("expires_at", 0) < time.time() or _dead(held)):
                self._break(held)
                continue
            if not self.wait:
                raise LeaseHeld(f"{self.what} is being written by {describe(held)}; try later")
            if not told and held is not None:
                print(f"[mmflow] {self.what}: waiting for {describe(held)}", flush=True)
                told = True
            time.sleep(self.poll)
        self._thread = threading.Thread(target=self._renew, name="mmflow-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
        held = self._read()
        if held is not None and held.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.storage.delete(self.uri)

    # --- internals ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({**self.record, "expires_at": time.time() + self.ttl}).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.storage.read_json_if_exists(self.uri)
        except (ValueError, OSError):  # half-written by a killed holder: treat as expired
            return {"token": None, "expires_at": 0}

    def _try_take(self) -> bool:
        if not is_remote(self.uri):
            _, path = filesystem(self.uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        if self._read() is not None:
            return False
        self.storage.write_atomic(self.uri, self._body())
        time.sleep(min(1.0, self.ttl / 10))  # let racing writers land, then see who is last
        held = self._read()
        return held is not None and held.get("token") == self.token

    def _break(self, expired: dict[str, Any]) -> None:
        again = self._read()
        if again is not None and again.get("token") == expired.get("token"):
            print(f"[mmflow] {self.what}: taking over the lease of {describe(expired)}, gone")
            with contextlib.suppress(FileNotFoundError, OSError):
                self.storage.delete(self.uri)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            held = self._read()
            if held is None or held.get("token") != self.token:
                self.lost = True  # expired under a stalled holder and taken over
                print(f"[mmflow] {self.what}: lost the lease to {describe(held)}", flush=True)
                return
            with contextlib.suppress(OSError):
                self.storage.write_atomic(self.uri, self._body())


def _dead(held: dict[str, Any]) -> bool:
    """The holder ran on this machine and its process is gone (killed): no need to wait for
    its lease to expire."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe(held: dict[str, Any] | None) -> str:
    if not held:
        return "another run"
    since = time.strftime("%H:%M:%S", time.localtime(held.get("since", 0)))
    run = f", MLflow run {held['run_id']}" if held.get("run_id") else ""
    return f"pid {held.get('pid')} on {held.get('host')} (since {since}{run})"
