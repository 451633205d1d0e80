#!/usr/bin/env bash
# A PostgreSQL server of its own in one folder, for an MLflow tracking server on one host.
#   infra/postgres.sh start DIR [PORT]   initialise DIR on first use, start (unless it runs),
#                                        print the base URI
#   infra/postgres.sh stop DIR
# DIR/data is the cluster, DIR/socket its unix socket, DIR/log/postgres.log its log. It listens on
# 127.0.0.1:PORT (default $PGPORT, else 5432) with password authentication only; the superuser
# `mlflow` gets a random password, kept in DIR/pgpass (libpq's format, mode 600): point
# PGPASSFILE at it and URIs carry no secret. Databases `mlflow` (runs, registry) and
# `mlflow_auth` (basic-auth users) are created. Printed on success, on stdout alone:
#   postgresql://mlflow@127.0.0.1:PORT
# Run as root, the server runs as the `postgres` system user (Debian's package creates it;
# PostgreSQL refuses to run as root), so DIR must be reachable by that user.
set -euo pipefail

usage() { echo "usage: $0 start DIR [PORT] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
CMD=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
PORT=${3:-${PGPORT:-5432}}

BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  echo "postgres.sh: no PostgreSQL server binaries in /usr/lib/postgresql/*/bin;" \
    "install them with infra/test-packages.sh (or apt-get install postgresql)" >&2
  exit 1
fi

AS=()
if [ "$(id -u)" -eq 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    echo "postgres.sh: running as root needs the 'postgres' system user (Debian's postgresql" \
      "package creates it); PostgreSQL refuses to run as root" >&2
    exit 1
  fi
  AS=(runuser -u postgres --)
fi

case "$CMD" in
start)
  if [ ! -s "$DIR/data/PG_VERSION" ]; then
    mkdir -p "$DIR/data" "$DIR/socket" "$DIR/log"
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$DIR/.pw")
    if [ ${#AS[@]} -gt 0 ]; then
      chown postgres: "$DIR/data" "$DIR/socket" "$DIR/log" "$DIR/.pw"
      if ! "${AS[@]}" test -x "$DIR"; then
        echo "postgres.sh: the postgres user cannot reach $DIR; use a folder it can" \
          "(every parent folder searchable by others)" >&2
        exit 1
      fi
    fi
    "${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U mlflow --pwfile="$DIR/.pw" \
      --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 ||
      { cat "$DIR/initdb.log" >&2; exit 1; }
    (umask 077 && printf '127.0.0.1:*:*:mlflow:%s\n' "$(cat "$DIR/.pw")" >"$DIR/pgpass")
    rm -f "$DIR/.pw"
    NEW=1
  fi
  if "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    # already running (the tracking server restarted): keep it, on the port it has
    PORT=$(sed -n 4p "$DIR/data/postmaster.pid")
  else
    # unix socket in DIR (never /var/run/postgresql, which another server may own); TCP on loopback
    "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log/postgres.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR/socket" >&2 ||
      { tail -n 20 "$DIR/log/postgres.log" >&2; exit 1; }
  fi
  if [ -n "${NEW:-}" ]; then
    for db in mlflow mlflow_auth; do
      PGPASSFILE="$DIR/pgpass" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U mlflow "$db"
    done
  fi
  echo "postgresql://mlflow@127.0.0.1:$PORT"
  ;;
stop)
  "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2
  ;;
*) usage ;;
esac
