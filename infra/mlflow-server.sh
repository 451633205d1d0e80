#!/usr/bin/env bash
# Start an MLflow tracking server for mmflow runs.
#   infra/mlflow-server.sh [HOST] [PORT] [ARTIFACTS] [BACKEND_URI]
# ARTIFACTS: a folder or s3://bucket/prefix (served through the server, so clients need no S3 keys).
# BACKEND_URI: sqlite:///mlflow-server.db by default; use postgresql://... in production.
set -euo pipefail
HOST=${1:-127.0.0.1}
PORT=${2:-5000}
ARTIFACTS=${3:-./mlflow-artifacts}
BACKEND=${4:-sqlite:///mlflow-server.db}
cd "$(dirname "$0")/.."
exec .uv/bin/uv run --frozen mlflow server --host "$HOST" --port "$PORT" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS"
