#!/usr/bin/env bash
# Quick start, part 2: set up, then run the whole test suite (real local Ray, real tars).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
