#!/usr/bin/env bash
# Create .venv and install placeforge into it (editable). Re-running is cheap: pip runs
# again only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.placeforge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing placeforge and its dependencies (first time: a few minutes)"
    .venv/bin/python -m pip install --quiet -e .
    touch "$stamp"
fi
