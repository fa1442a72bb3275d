"""benchmarks/bench_startup.py --quick, one round, as a user runs it: every row is measured and
printed, and the import summary parses -X importtime output the way Python writes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = ("(R0) recluster.py, version 0", "(E) evaluate.py --test-set")  # the rows the test runs (--rows R0,E):
# the others are the same commands on another Ray, and would add minutes to the suite


def test_import_summary_adds_self_times_by_package(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the script imports its sibling bench_build_shards
    from bench_startup import import_summary

    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       500 |        500 |     torch._C",
        "import time:      1500 |       2000 |   torch",
        "import time:       250 |       2250 | webdataset",
        "2026-11-30 09:00:00 INFO a log line | with a bar",
        "import time:       400 |        400 | ray",
        "import time:      1000 |       1000 | ray.data._internal",
        "import time:        50 |         50 | rayon",
    ])
    seconds = import_summary(stderr)
    assert seconds == pytest.approx({"all": 0.0037, "torch": 0.002, "webdataset": 0.00025, "ray": 0.0004,
                                     "ray.data": 0.001})


@pytest.mark.ray
@pytest.mark.slow
def test_quick_round_prints_every_row(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from bench_startup import HEAVY_IMPORTS

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "benchmarks/bench_startup.py", "--quick", "--rounds", "1", "--rows", "R0,E",
                          "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| (")]
    for row in ROWS:
        timed = [line for line in table if line.startswith(f"| {row}")]
        assert timed, f"{row} missing from:\n{run.stdout}"
        best_s, median_s, worst_s, cpu_best, cpu_median = (float(x) for x in timed[0].split("|")[2:7])
        assert 0 < best_s <= median_s <= worst_s and cpu_best > 0
    imports = [line for line in table if line.count("|") == len(HEAVY_IMPORTS) + 3]  # command, all, packages
    assert len(imports) == 1  # R0's driver imports (R1J and EJ's when those rows run)
    assert all(float(line.split("|")[2]) > 0 for line in imports)  # every driver imports something
