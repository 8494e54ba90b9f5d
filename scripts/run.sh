#!/usr/bin/env bash
# Installs the runtime requirements into .venv (or $VENV) and starts the app. Arguments go to app.py
# (e.g. --model random:tiny to try the interface on a tiny test model whose answers are noise).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
exec python app.py "$@"
