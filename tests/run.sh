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

# pytest's exit code 5 ("no tests collected") is a failure here, like any non-zero code.
exec python -m pytest -q -p no:cacheprovider "$@"
