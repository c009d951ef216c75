#!/usr/bin/env bash
# Makes sure the PostgreSQL the tests use answers on 127.0.0.1:5432 (installing and starting the
# local cluster when needed), and drops databases left behind by interrupted test runs.
set -euo pipefail

ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! command -v pg_isready >/dev/null 2>&1 || ! ls /etc/postgresql >/dev/null 2>&1; then
  echo "ensure-postgres: installing PostgreSQL from Debian's packages" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || { echo "ensure-postgres: could not install PostgreSQL" >&2; exit 1; }
fi

if ! ready; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 60); do ready && break; sleep 0.5; done
fi
ready || { echo "ensure-postgres: PostgreSQL is not answering on 127.0.0.1:5432" >&2; exit 1; }

url="${OPPSYNC_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
if ! psql "$url" -qtAc 'select 1' >/dev/null 2>&1; then
  # A fresh cluster: trust local TCP connections and create the test database.
  su postgres -c "psql -qtAc \"select 1 from pg_database where datname = 'test'\"" | grep -q 1 \
    || su postgres -c "createdb test"
fi
psql "$url" -qtAc "select datname from pg_database where datname like 'oppsync\_t\_%'" 2>/dev/null |
  while read -r db; do
    [ -n "$db" ] && psql "$url" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true
  done
exit 0
