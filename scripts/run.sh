#!/usr/bin/env bash
# Installs the runtime requirements into .venv and starts the app. Arguments go to app.py
# (e.g. --model ./checkpoints/tiny for a UI-only trial with random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
exec python app.py "$@"
