#!/usr/bin/env bash
# The one test command (README "Installation"; .ci/run calls exactly this).
# Installs what the tests need on a fresh Debian machine with only the package
# registries reachable, then runs the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

export YOLO_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
export YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-${TMPDIR:-/tmp}/facelab-ultralytics}"

python -m pip install --quiet --disable-pip-version-check -r requirements.txt

# Debian's Chromium for the browser tests (Playwright cannot download its own here).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "tests/run.sh: /usr/bin/chromium is missing; install Debian's 'chromium' package (browser tests will skip)" >&2
  fi
fi

# PostgreSQL: a private, throwaway cluster on loopback so every test that takes the
# `database_url` fixture (tests/conftest.py) runs on SQLite AND PostgreSQL in one pass.
# Set FACELAB_TEST_PG=0 to skip it (SQLite only); CI always runs it.
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ "${FACELAB_TEST_PG:-1}" != 0 ] && [ -z "${FACELAB_TEST_PG_URL:-}" ]; then
  if [ -z "$(pg_bin)" ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      echo "tests/run.sh: PostgreSQL is not installed; install Debian's 'postgresql' package or set FACELAB_TEST_PG=0" >&2
      exit 1
    fi
  fi
  PG_BIN="$(pg_bin)"
  PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/facelab-pg.XXXXXX")"
  PG_PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  PG_PASSWORD="$(python -c 'import secrets; print(secrets.token_hex(16))')"
  as_pg() { (cd "$PG_DIR" && if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi); }
  [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
  printf '%s\n' "$PG_PASSWORD" >"$PG_DIR/pw" && chmod 600 "$PG_DIR/pw"
  [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR/pw"
  stop_pg() {
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
  }
  trap stop_pg EXIT
  as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U facelab --pwfile="$PG_DIR/pw" -A scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
  rm -f "$PG_DIR/pw"
  # fsync off: a test cluster thrown away at exit needs no durability, and it is far faster
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
    -o "-k $PG_DIR -p $PG_PORT -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
    || { cat "$PG_DIR/server.log" >&2; exit 1; }
  export FACELAB_TEST_PG_URL="postgresql+psycopg://facelab:${PG_PASSWORD}@127.0.0.1:${PG_PORT}/postgres"
  echo "tests/run.sh: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (data in $PG_DIR)"
fi

# PostgreSQL 16 with pgvector, for the pgvector search backend (tests/test_pgvector.py):
# Debian 12 has no pgvector package; the pgserver wheel (requirements.txt) bundles both.
# Its binaries find their libraries at $ORIGIN/../../../pgserver.libs, so for the
# postgres user (who cannot enter /root) both folders are copied side by side.
# Set FACELAB_TEST_PGVECTOR=0 to skip it; CI always runs it.
if [ "${FACELAB_TEST_PGVECTOR:-1}" != 0 ] && [ -z "${FACELAB_TEST_PGVECTOR_URL:-}" ]; then
  PGV_SITE="$(python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("pgserver").origin).parents[1])')"
  PGV_DIR="$(mktemp -d "${TMPDIR:-/tmp}/facelab-pgvector.XXXXXX")"
  PGV_PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  PGV_PASSWORD="$(python -c 'import secrets; print(secrets.token_hex(16))')"
  if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGV_DIR/site/pgserver"
    cp -a "$PGV_SITE/pgserver/pginstall" "$PGV_DIR/site/pgserver/" && cp -a "$PGV_SITE/pgserver.libs" "$PGV_DIR/site/"
    PGV_BIN="$PGV_DIR/site/pgserver/pginstall/bin"
    chown -R postgres "$PGV_DIR"
  else
    PGV_BIN="$PGV_SITE/pgserver/pginstall/bin"
  fi
  as_pgv() { (cd "$PGV_DIR" && if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi); }
  printf '%s\n' "$PGV_PASSWORD" >"$PGV_DIR/pw" && chmod 600 "$PGV_DIR/pw"
  [ "$(id -u)" = 0 ] && chown postgres "$PGV_DIR/pw"
  stop_pgv() {
    as_pgv "$PGV_BIN/pg_ctl" -D "$PGV_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PGV_DIR"
  }
  # one EXIT trap for both clusters (a second `trap` would replace the first)
  if [ -n "${PG_DIR:-}" ]; then trap 'stop_pg; stop_pgv' EXIT; else trap stop_pgv EXIT; fi
  as_pgv "$PGV_BIN/initdb" -D "$PGV_DIR/data" -U facelab --pwfile="$PGV_DIR/pw" -A scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$PGV_DIR/initdb.log" 2>&1 || { cat "$PGV_DIR/initdb.log" >&2; exit 1; }
  rm -f "$PGV_DIR/pw"
  as_pgv "$PGV_BIN/pg_ctl" -D "$PGV_DIR/data" -l "$PGV_DIR/server.log" -w -t 60 \
    -o "-k $PGV_DIR -p $PGV_PORT -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100" start >/dev/null \
    || { cat "$PGV_DIR/server.log" >&2; exit 1; }
  export FACELAB_TEST_PGVECTOR_URL="postgresql+psycopg://facelab:${PGV_PASSWORD}@127.0.0.1:${PGV_PORT}/postgres"
  echo "tests/run.sh: PostgreSQL $("$PGV_BIN/postgres" --version | awk '{print $3}') with pgvector on 127.0.0.1:$PGV_PORT"
fi

# pytest's exit code 5 ("no tests collected") is a failure here, like any non-zero code.
# (not `exec`: the EXIT trap above must still stop PostgreSQL)
rc=0
python -m pytest -q -p no:cacheprovider "$@" || rc=$?
exit "$rc"
