#!/usr/bin/env bash
# Start an MLflow tracking server for mmflow runs: a SQL backend, artifacts proxied to a folder or
# S3 (clients need no S3 keys), optionally MLflow's basic-auth app. Configured by environment:
#
#   MLFLOW_BACKEND_STORE_URI      sqlite:///mlflow-server.db (here) |
#                                 postgresql+psycopg2://user:password@db:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  ./mlflow-artifacts | s3://bucket/prefix (S3 keys and
#                                 AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL in this environment)
#   MMFLOW_SERVER_HOST, _PORT     127.0.0.1, 5000;  MMFLOW_SERVER_WORKERS: MLflow's default (4)
#   MMFLOW_SERVER_AUTH            none (default) | basic: MLflow's basic-auth app, which then needs
#     MLFLOW_AUTH_ADMIN_PASSWORD    the admin's password (MLFLOW_AUTH_ADMIN_USERNAME: admin), set
#                                   when the user store is created, ignored afterwards
#     MMFLOW_AUTH_DATABASE_URI      the user store: sqlite:///mlflow-auth.db (here), or the
#                                   `mlflow_auth` database of --with-postgres
#     MMFLOW_AUTH_DEFAULT_PERMISSION  READ (what a signed-in user may do to others' experiments)
#     MMFLOW_AUTH_CACHE_TTL_SECONDS   60: how long a checked password is trusted without hashing
#                                   it again (each check is a 1M-round PBKDF2, and a training job
#                                   sends hundreds of requests); a changed password or a deleted
#                                   user is refused at once by the worker that changed it, by the
#                                   others within this time. 0: check every request
#     MLFLOW_FLASK_SERVER_SECRET_KEY  the CSRF key: random per start unless set (set it when
#                                   several servers share one database)
#     MLFLOW_AUTH_CONFIG_PATH       an auth .ini of your own instead of the MMFLOW_AUTH_* above
#   MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_SERVER_CORS_ALLOWED_ORIGINS: read by MLflow itself; set
#   them when clients reach the server by a name other than localhost or a private address.
#
#   infra/mlflow-server.sh [--with-postgres DIR] [HOST] [PORT] [ARTIFACTS] [BACKEND_URI]
# Arguments, when given, take the place of the variables above. --with-postgres DIR starts (and
# on first use initialises) a PostgreSQL server in DIR with infra/postgres.sh, on
# 127.0.0.1:$MMFLOW_POSTGRES_PORT (default 5432), and uses its `mlflow` database (and `mlflow_auth`
# for users), the password in DIR/pgpass only. This script hands URIs to MLflow in its
# environment, never on its command line (which `ps` shows): give a URI holding a password in
# MLFLOW_BACKEND_STORE_URI, not as an argument.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "mlflow-server.sh: $*" >&2; exit 2; }

PG_DIR=${MMFLOW_POSTGRES_DIR:-}
if [ "${1:-}" = "--with-postgres" ]; then
  [ $# -ge 2 ] || die "--with-postgres needs a folder"
  PG_DIR=$2
  shift 2
fi
HOST=${1:-${MMFLOW_SERVER_HOST:-127.0.0.1}}
PORT=${2:-${MMFLOW_SERVER_PORT:-5000}}
export MLFLOW_ARTIFACTS_DESTINATION=${3:-${MLFLOW_ARTIFACTS_DESTINATION:-./mlflow-artifacts}}
BACKEND=${4:-${MLFLOW_BACKEND_STORE_URI:-}}
AUTH=${MMFLOW_SERVER_AUTH:-none}
AUTH_DB=${MMFLOW_AUTH_DATABASE_URI:-}

if [ -n "$PG_DIR" ]; then
  [ -z "$BACKEND" ] || die "--with-postgres and a backend URI: give one of them"
  PG=$("$REPO/infra/postgres.sh" start "$PG_DIR" "${MMFLOW_POSTGRES_PORT:-5432}")
  PG_DIR=$(cd "$PG_DIR" && pwd)
  export PGPASSFILE=$PG_DIR/pgpass # the password stays in that file, out of every URI
  PG=postgresql+psycopg2://${PG#postgresql://}
  BACKEND=$PG/mlflow
  AUTH_DB=${AUTH_DB:-$PG/mlflow_auth}
fi
export MLFLOW_BACKEND_STORE_URI=${BACKEND:-sqlite:///mlflow-server.db}

# MLflow from the project's environment (psycopg2 and boto3 are in its dev group)
if [ -x "$REPO/.venv/bin/mlflow" ]; then
  PY=("$REPO/.venv/bin/python")
  MLFLOW=("$REPO/.venv/bin/mlflow")
else
  PY=("$REPO/.uv/bin/uv" run --project "$REPO" --frozen python)
  MLFLOW=("$REPO/.uv/bin/uv" run --project "$REPO" --frozen mlflow)
fi
need() { # module, what for
  "${PY[@]}" -c "import $1" 2>/dev/null ||
    die "$2 needs the Python module $1, in the project's dev group (.uv/bin/uv sync --frozen)"
}
for uri in "$MLFLOW_BACKEND_STORE_URI" "$AUTH_DB"; do
  case "$uri" in
  postgresql+psycopg2://*) need psycopg2 "a postgresql+psycopg2:// store" ;;
  postgresql://* | postgres://*)
    # SQLAlchemy 2.1 reads a bare postgresql:// as its psycopg (3) driver; the project has psycopg2
    "${PY[@]}" -c "import psycopg" 2>/dev/null ||
      die "a bare postgresql:// URI means the psycopg (3) driver, not installed here;" \
        "write postgresql+psycopg2://... (psycopg2-binary is in the dev group)"
    ;;
  esac
done
case "$MLFLOW_ARTIFACTS_DESTINATION" in s3://*) need boto3 "an s3:// artifacts destination" ;; esac

# MLflow's server-side jobs (GenAI judges, trace roll-ups) are nothing mmflow uses; left on, they
# start a consumer process tree of their own
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
ARGS=(--host "$HOST" --port "$PORT" --serve-artifacts)
[ -z "${MMFLOW_SERVER_WORKERS:-}" ] || ARGS+=(--workers "$MMFLOW_SERVER_WORKERS")
case "$AUTH" in
none) ;;
basic)
  need flask_wtf "MMFLOW_SERVER_AUTH=basic (MLflow's basic-auth app, mlflow[auth])"
  if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] ||
      die "MMFLOW_SERVER_AUTH=basic needs MLFLOW_AUTH_ADMIN_PASSWORD (the admin user's password)"
    # the file names the user store (a URI, maybe with a password): readable by this user only
    CONF_DIR=${PG_DIR:-$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")}
    (umask 077 && cat >"$CONF_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = ${MMFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${AUTH_DB:-sqlite:///mlflow-auth.db}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MMFLOW_AUTH_CACHE_TTL_SECONDS:-60}
EOF
    )
    export MLFLOW_AUTH_CONFIG_PATH=$CONF_DIR/basic_auth.ini
  fi
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(head -c 32 /dev/urandom | base64)
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  ARGS+=(--app-name basic-auth)
  ;;
*) die "MMFLOW_SERVER_AUTH is '$AUTH'; use none or basic" ;;
esac

exec "${MLFLOW[@]}" server "${ARGS[@]}"
