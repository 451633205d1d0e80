"""Submit a pipeline to a running Ray cluster as a Ray job, and follow its log.

    python jobs/submit.py --address http://HEAD:8265 pipelines/quickstart.yaml \
        --storage s3://bucket/mmflow --tracking-uri http://mlflow:5000 [--set ...] [--only ...]

It is the same as ``ray job submit --working-dir . -- python jobs/run_pipeline.py ...``,
plus: the working directory is uploaded without local outputs (.venv, mmflow-data,
mlflow.db), MLFLOW_TRACKING_URI and AWS_* settings are forwarded to the job, and
the exit status is the job's. Use shared storage (s3:// or a shared mount) and a
tracking server the cluster can reach; a local folder or sqlite file on your laptop
is not visible to the cluster.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="Ray dashboard address of the cluster (default: $RAY_ADDRESS)",
    )
    parser.add_argument("--no-wait", action="store_true", help="submit and return the job id")
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

    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env: dict = {
        "working_dir": ".",
        "excludes": EXCLUDES,
        "env_vars": {k: os.environ[k] for k in FORWARD_ENV if k in os.environ},
    }
    if args.pip:
        runtime_env["pip"] = ["-e", "."]
    client = JobSubmissionClient(args.address)
    entrypoint = shlex.join(["python", "jobs/run_pipeline.py", *run_args])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0
    offset = 0
    while True:
        logs = client.get_job_logs(job_id)
        print(logs[offset:], end="", flush=True)
        offset = len(logs)
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"\njob {job_id}: {status}", flush=True)
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
