#!/usr/bin/env bash
# Create .venv and install placeforge into it (editable). Re-running is cheap: pip runs
# again only when pyproject.toml changed since the last successful install.
#   bash scripts/setup.sh          # what the demo needs
#   bash scripts/setup.sh test     # plus the test tools (the "test" extra)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
extras="${1:-}"
stamp=.venv/.placeforge-installed${extras:+-$extras}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing placeforge${extras:+[$extras]} and its dependencies (first time: a few minutes)"
    .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
    # DeepSpeed compiles its CPU communication op on first use (about 40 s on 2 cores, cached
    # under ~/.cache/torch_extensions per venv): do it here, as part of the one-time install,
    # rather than inside the first training run.
    echo "setup: building DeepSpeed's CPU communication op (once)"
    .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
    touch "$stamp"
fi
