#!/usr/bin/env bash
# Install the PostgreSQL server (Debian's `postgresql` package) unless its binaries are here.
# infra/postgres.sh and the tracking-server tests need initdb, pg_ctl and postgres from it.
set -euo pipefail
if compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  exit 0
fi
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql
