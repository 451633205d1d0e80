"""Submit a pipeline to a running Ray cluster as a Ray job, and follow its log.

    python jobs/submit.py --address http://HEAD:8265 pipelines/quickstart.yaml \
        --storage s3://bucket/mmflow --tracking-uri http://mlflow:5000 [--set ...] [--only ...]

It is the same as ``ray job submit --working-dir . -- python jobs/run_pipeline.py ...``,
plus: the working directory is uploaded without local outputs (.venv, mmflow-data,
mlflow.db), MLFLOW_TRACKING_URI and the non-secret AWS settings (endpoint, region)
are forwarded to the job, and the exit status is the job's. Use shared storage
(s3:// or a shared mount) and a tracking server the cluster can reach; a local
folder or sqlite file on your laptop is not visible to the cluster.

Credentials are never sent with the job: a Ray job's env vars and entrypoint are
shown to anyone who reaches the dashboard or the job API. AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN are not forwarded; the job's S3 and
MLflow credentials come from the cluster (instance or pod roles, Kubernetes
secrets mounted as env vars or files on the nodes, ~/.aws on the nodes). A
tracking URI or argument holding a password or a signed query is refused (exit 2)
unless --allow-credentials-in-job; what this script prints is redacted.
See docs/reliability.md, "Secrets".
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

# Run as a script from a checkout: the mmflow package is the folder above.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmflow.redact import redact_uri  # noqa: E402

# Settings only: never credentials (see the module docstring).
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
EXCLUDES = [
    ".venv",
    ".uv",
    "mmflow-data",
    "mlflow.db",
    "mlruns",
    "mlartifacts",
    ".git",
    "**/__pycache__",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="Ray dashboard address of the cluster (default: $RAY_ADDRESS)",
    )
    parser.add_argument("--no-wait", action="store_true", help="submit and return the job id")
    parser.add_argument(
        "--allow-credentials-in-job",
        action="store_true",
        help="send a tracking URI or argument that holds a password or signed query anyway "
        "(it will be visible in the Ray dashboard and job API)",
    )
    parser.add_argument(
        "--pip",
        action="store_true",
        help="install mmflow's dependencies in the job's runtime env (clusters without them)",
    )
    args, run_args = parser.parse_known_args(argv)
    if not run_args:
        parser.error("give the pipeline YAML and any `mmflow run` options")

    # Ray >= 2.5x clusters require token auth; a client sends the token only in token mode.
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token_path)
    ):
        os.environ["RAY_AUTH_MODE"] = "token"

    env_vars = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    exposed = [f"{k}={v}" for k, v in env_vars.items() if redact_uri(v) != v]
    exposed += [a for a in run_args if redact_uri(a) != a]
    if exposed and not args.allow_credentials_in_job:
        shown = ", ".join(redact_uri(e) for e in exposed)
        print(
            f"error: {shown} holds credentials, and a Ray job's env vars and entrypoint are "
            "visible to anyone who reaches the dashboard or the job API. Give the cluster its "
            "credentials (instance role, Kubernetes secret, ~/.aws or env on the nodes) and "
            "pass URIs without them, or add --allow-credentials-in-job.",
            file=sys.stderr,
        )
        return 2

    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env: dict = {"working_dir": ".", "excludes": EXCLUDES, "env_vars": env_vars}
    if args.pip:
        runtime_env["pip"] = ["-e", "."]
    # Ray 2.60 warns, for every upload, that the default excludes (.git among them) are now
    # excluded: EXCLUDES names them anyway, so the note is only noise in the user's terminal.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    client = JobSubmissionClient(args.address)
    entrypoint = shlex.join(["python", "jobs/run_pipeline.py", *run_args])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {job_id}: {redact_uri(entrypoint)}", flush=True)
    if args.no_wait:
        return 0
    offset = 0
    while True:
        status = client.get_job_status(job_id)
        finished = status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
        logs = client.get_job_logs(job_id)
        # whole lines only (a URI cut between two polls would escape redaction), all at the end
        end = len(logs) if finished else logs.rfind("\n", offset) + 1
        if end > offset:
            print(redact_uri(logs[offset:end]), end="", flush=True)
            offset = end
        if finished:
            print(f"\njob {job_id}: {status}", flush=True)
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
