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

# pytest's exit code 5 ("no tests collected") is a failure here, like any non-zero code.
# (not `exec`: the EXIT trap above must still stop PostgreSQL)
rc=0
python -m pytest -q -p no:cacheprovider "$@" || rc=$?
exit "$rc"
