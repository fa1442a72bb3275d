#!/usr/bin/env bash
# Quick start, part 1: set up, then run the main job on the embedded default
# (a synthetic city -> catalog -> place-aware shards) into runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/placeforge demo --out runs/demo "$@"
