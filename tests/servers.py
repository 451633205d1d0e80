"""Real servers for tests, as context managers any test module can import (tests/conftest.py
wraps them in session fixtures):

- :func:`moto_s3`: a moto S3 server on loopback and the environment that points clients at it;
- :func:`postgres`: a PostgreSQL server of its own in a tmp folder (``infra/postgres.sh``);
- :func:`mlflow_server`: ``infra/mlflow-server.sh`` itself, configured by environment;
- :func:`tracking_stack`: the three together, as teams run MLflow: runs and the registry in
  PostgreSQL, artifacts proxied to S3 (only the server holds the S3 keys), basic auth on, with an
  admin and one ordinary user whose credentials a client passes as
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.

Every server listens on 127.0.0.1 on a free port, keeps its files in a folder of its own and is
stopped by its own process id (or, for PostgreSQL, ``pg_ctl stop``) on exit.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True``: its whole process group (MLflow's
    uvicorn workers are children of the ``mlflow server`` process)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def moto_s3(buckets: tuple[str, ...] = ("mmflow-test",)) -> Iterator[dict[str, str]]:
    """A moto S3 server with ``buckets`` created; yields the environment a client needs
    (``AWS_ENDPOINT_URL`` and test keys). The caller decides where that environment goes."""
    import boto3

    port = free_port()
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(
            12
        ),  # moto takes any; a test can look for it
        "AWS_REGION": "us-east-1",
    }
    try:
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )
        for bucket in buckets:
            for _ in range(300):
                try:
                    client.create_bucket(Bucket=bucket)
                    break
                except Exception:
                    if proc.poll() is not None:
                        raise RuntimeError("moto_server exited at start") from None
                    time.sleep(0.1)
            else:
                raise RuntimeError(f"moto_server on port {port} did not answer in 30 s")
        yield env
    finally:
        _stop(proc)


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL: ``uri`` is ``postgresql://mlflow@127.0.0.1:PORT`` (no password: it
    is in ``passfile``, which libpq reads through ``PGPASSFILE``)."""

    folder: str
    uri: str
    passfile: str

    def url(self, database: str) -> str:
        """The SQLAlchemy URI of ``database`` for MLflow: the driver named, as SQLAlchemy 2.1
        reads a bare ``postgresql://`` as psycopg 3, and the project has psycopg2."""
        return f"postgresql+psycopg2://{self.uri.removeprefix('postgresql://')}/{database}"

    def connect(self, database: str = "mlflow"):
        import psycopg2

        return psycopg2.connect(f"{self.uri}/{database}", passfile=self.passfile)

    def query(self, sql: str, args: tuple = (), database: str = "mlflow") -> list[tuple]:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()


@contextmanager
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL server (``infra/postgres.sh``) with databases ``mlflow`` and
    ``mlflow_auth``, in a tmp folder the ``postgres`` system user can reach (tests run as root,
    and PostgreSQL refuses to). Needs the server binaries: ``infra/test-packages.sh``."""
    folder = tempfile.mkdtemp(prefix="mmflow-pg-")
    os.chmod(folder, 0o755)  # mkdtemp's 0700 would keep the postgres user out
    r = subprocess.run(
        [os.path.join(INFRA, "postgres.sh"), "start", folder, str(free_port())],
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        if r.returncode != 0:
            raise RuntimeError(f"infra/postgres.sh start failed:\n{r.stderr[-3000:]}")
        yield Postgres(folder, r.stdout.strip(), os.path.join(folder, "pgpass"))
    finally:
        if r.returncode == 0:
            subprocess.run(
                [os.path.join(INFRA, "postgres.sh"), "stop", folder],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class TrackingServer:
    """A running MLflow server: ``url``; ``users`` maps user name -> password (empty without
    auth); ``folder`` holds its log (``server.log``) and any local files."""

    url: str
    folder: str
    users: dict[str, str] = field(default_factory=dict)
    admin: str | None = None
    user: str | None = None  # an ordinary (non-admin) user, when auth is on
    pgid: int = 0  # the server's process group: the script (exec'd into MLflow) and its workers

    def client_env(self, user: str | None = None) -> dict[str, str]:
        """What a client process needs: the URI and, with auth, one user's credentials."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        name = user or self.user
        if name:
            env |= {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": self.users[name]}
        return env

    def log(self) -> str:
        with open(os.path.join(self.folder, "server.log"), errors="replace") as f:
            return f.read()


@contextmanager
def mlflow_server(
    backend_uri: str | None = None,
    artifacts: str | None = None,
    auth: bool = False,
    env: dict[str, str] | None = None,
    start_timeout: float = 300,
) -> Iterator[TrackingServer]:
    """``infra/mlflow-server.sh`` on a free port with one worker, configured by environment
    (``env`` adds to it: S3 keys, ``PGPASSFILE``); the defaults put sqlite and the artifacts
    in its own tmp folder. With ``auth``, basic auth with a random admin password."""
    folder = tempfile.mkdtemp(prefix="mmflow-mlflow-")
    port = free_port()
    users: dict[str, str] = {}
    server_env = {
        **os.environ,
        **(env or {}),
        "MMFLOW_SERVER_HOST": "127.0.0.1",
        "MMFLOW_SERVER_PORT": str(port),
        "MMFLOW_SERVER_WORKERS": "1",
        "MLFLOW_BACKEND_STORE_URI": backend_uri or f"sqlite:///{folder}/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts or os.path.join(folder, "artifacts"),
        "MMFLOW_SERVER_AUTH": "basic" if auth else "none",
        "TMPDIR": folder,  # the script's auth .ini and MLflow's own tmp files go with the folder
    }
    if auth:
        users["admin"] = secrets.token_urlsafe(18)
        server_env |= {"MLFLOW_AUTH_ADMIN_USERNAME": "admin"}
        server_env |= {"MLFLOW_AUTH_ADMIN_PASSWORD": users["admin"]}
        server_env.setdefault("MMFLOW_AUTH_DATABASE_URI", f"sqlite:///{folder}/auth.db")
    with open(os.path.join(folder, "server.log"), "wb") as log:
        proc = subprocess.Popen(
            [os.path.join(INFRA, "mlflow-server.sh")],
            cwd=folder,
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = TrackingServer(
        f"http://127.0.0.1:{port}", folder, users, "admin" if auth else None, None, proc.pid
    )
    try:
        _wait_healthy(server, proc, start_timeout)
        yield server
    finally:
        _stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_healthy(server: TrackingServer, proc: subprocess.Popen, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"infra/mlflow-server.sh exited {proc.returncode}:\n{server.log()}")
        try:
            if requests.get(f"{server.url}/health", timeout=30).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or still starting
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the MLflow server did not answer in {timeout:.0f} s:\n{server.log()}")


def create_user(server: TrackingServer, name: str) -> TrackingServer:
    """Create an ordinary user through the auth API as the admin; the server, with that user as
    its ``user``."""
    import requests

    password = secrets.token_urlsafe(18)
    r = requests.post(
        f"{server.url}/api/2.0/mlflow/users/create",
        json={"username": name, "password": password},
        auth=(server.admin, server.users[server.admin]),
        timeout=60,
    )
    r.raise_for_status()
    return dataclasses.replace(server, users={**server.users, name: password}, user=name)


@dataclass(frozen=True)
class TrackingStack:
    """``server`` backed by ``db`` (its ``mlflow`` and ``mlflow_auth`` databases), artifacts
    under ``artifacts`` (``s3://BUCKET/PREFIX``) on the moto server that ``s3_env`` reaches."""

    server: TrackingServer
    db: Postgres
    s3_env: dict[str, str]
    bucket: str
    artifacts: str


@contextmanager
def tracking_stack(bucket: str = "mlflow-artifacts") -> Iterator[TrackingStack]:
    """PostgreSQL + moto S3 + ``infra/mlflow-server.sh`` with basic auth and proxied artifacts;
    the S3 keys are in the server's environment only. The server's ``user`` is an ordinary
    user ``mmflow``."""
    with moto_s3((bucket,)) as s3, postgres() as db:
        env = {
            **s3,
            "MLFLOW_S3_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"],
            "PGPASSFILE": db.passfile,
            "MMFLOW_AUTH_DATABASE_URI": db.url("mlflow_auth"),
        }
        artifacts = f"s3://{bucket}/mlflow"
        with mlflow_server(db.url("mlflow"), artifacts, auth=True, env=env) as server:
            yield TrackingStack(create_user(server, "mmflow"), db, s3, bucket, artifacts)
