#!/usr/bin/env bash
# Installs everything the test suite needs (Python venv, dev requirements, Debian's chromium for the
# browser test) and runs the whole suite. CI runs exactly this (see .ci/run). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-dev.txt

# The browser test drives Debian's chromium through Playwright (Playwright's own browser download
# does not work offline). Installing it needs root; fail loudly rather than skip the test.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
export DSVL_CHROMIUM="${DSVL_CHROMIUM:-$(command -v chromium)}"

exec python -m pytest "$@"
