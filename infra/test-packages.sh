#!/usr/bin/env bash
# System packages that some tests drive for real, from Debian's packages, installed when missing:
# PostgreSQL (the MLflow tracking server's backend) and headless Chromium (the MLflow UI test).
# Without root (or apt) it says what is missing and carries on: those tests then skip, naming it.
set -uo pipefail
need=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || need+=(postgresql)
command -v chromium > /dev/null || need+=(chromium)
((${#need[@]})) || exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get > /dev/null; then
  echo "installing ${need[*]} (Debian packages, for the tests)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > /dev/null \
    || echo "could not install ${need[*]}: the tests that need them will skip" >&2
else
  echo "missing ${need[*]} (apt-get install ${need[*]} as root): the tests that need them will skip" >&2
fi
exit 0
