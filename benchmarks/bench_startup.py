"""Fixed start-up of pipelines/recluster.py and pipelines/evaluate.py, as whole processes (issue 14).

    .venv/bin/python benchmarks/bench_startup.py [--rounds 3] [--num-cpus 2] [--before /tmp/old-checkout]
    .venv/bin/python benchmarks/bench_startup.py --quick --rounds 1 [--rows R0,E]

A tiny fixture is made once: the synthetic city (its training images and GSV-Cities places,
a few hundred images), its shard set (`pipelines/build_shards.py` on a Ray of its own) and a
tiny model checkpoint (`vit_tiny_test` at 56 px with a pair classifier, as the tests make
one).  The work of every command is then small, so what is timed is mostly fixed cost:
interpreter start, imports, Ray's start-up, Ray Data's worker processes and ray.shutdown.

Rows, each a command of its own, timed as a whole process (bench_build_shards.timed_process:
wall seconds, and CPU seconds of the command's whole process tree, Ray's processes included):
(R0) `recluster.py --shards S --labels L`: label version 0, from the catalog alone (no model)
(R1) `recluster.py ... --checkpoint M.pt`: a K-means round, on a Ray it starts itself
(E)  `evaluate.py --checkpoint M.pt --test-set T`: the city's test split, on a Ray it starts itself
(R1J), (EJ): R1 and E as later jobs on a running Ray (`ray start --head`, joined through
     $RAY_ADDRESS as `ray job submit` does; bench_build_shards.running_head), which has run one
     K-means round before; the head's workers' CPU during the command is counted
With --before CHECKOUT every row also runs from that checkout (PYTHONPATH=CHECKOUT), e.g. a
`git archive HEAD | tar -x -C /tmp/old` of the code before a change.  Rounds alternate their
order, so a change in the machine's load falls on all rows; CPU seconds are the figure to compare
on a shared machine, wall seconds move with its load.

Before the rounds, each command runs once more under `python -X importtime` (R1 and E joined to
the running Ray, so no Ray start-up is paid for it): the driver's import time in all, and that of
the heavy packages it loads, so the fixed costs of its imports are visible apart from Ray's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_build_shards import REPO, running_head, timed_process

# Packages whose import shows up as a fixed cost of a driver (import_summary).
HEAVY_IMPORTS = ("torch", "timm", "webdataset", "matplotlib", "faiss", "scipy", "polars", "ray", "ray.data")

ROW_NAMES = {
    "R0": "(R0) recluster.py, version 0 (no checkpoint)",
    "R1": "(R1) recluster.py --checkpoint, K-means round",
    "E": "(E) evaluate.py --test-set",
    "R1J": "(R1J) recluster.py --checkpoint, on a running Ray",
    "EJ": "(EJ) evaluate.py, on a running Ray",
}
JOINED = {"R1J": "R1", "EJ": "E"}


def make_fixture(work: Path, quick: bool, num_cpus: int, env: dict[str, str]) -> dict[str, Path]:
    """The city, its shard set and a tiny checkpoint under `work`: {"shards", "test_set", "checkpoint"}."""
    import torch

    from placeforge.models.checkpoint import save_model_checkpoint
    from placeforge.models.decoder import SiameseMIMDecoder, decoder_config
    from placeforge.models.encoders import EncoderConfig, build_model
    from placeforge.models.heads import PairClassifier
    from synthcity import generate
    from synthcity.synth_config import SynthConfig

    synth = SynthConfig.tiny()  # ~220 images at 160 x 120
    if not quick:  # a few hundred training images: still seconds of work, so start-up dominates
        synth = dataclasses.replace(synth, train_places=40, gsv_places=16)
    generate(work / "city", synth, progress=False)
    sources = ["--source", f"atname:{work / 'city' / 'atname' / 'train'}"]
    if not quick:
        sources += ["--source", f"gsv_cities:{work / 'city' / 'gsv_cities'}"]
    subprocess.run([sys.executable, "pipelines/build_shards.py", *sources, "--out", str(work / "shards"),
                    "--num-cpus", str(num_cpus), "--images-per-shard", "40", "--short-side", "64"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    torch.manual_seed(0)
    cfg = EncoderConfig(name="vit_tiny_test", image_size=56, descriptor_dim=32)
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, 14), hidden_dim=32)
    checkpoint = save_model_checkpoint(build_model(cfg), cfg, work / "tiny.pt", pair=pair, decoder="dec64d2b")
    return {"shards": work / "shards", "test_set": work / "city" / "atname" / "test", "checkpoint": checkpoint}


def command(key: str, fixture: dict[str, Path], out: Path, num_cpus: int) -> list[str]:
    """The command line of row `key` (R0, R1, E; a joined row runs its fresh row's command)."""
    key = JOINED.get(key, key)
    if key == "R0":
        return [sys.executable, "pipelines/recluster.py", "--shards", str(fixture["shards"]), "--labels", str(out)]
    if key == "R1":
        return [sys.executable, "pipelines/recluster.py", "--shards", str(fixture["shards"]), "--labels", str(out),
                "--checkpoint", str(fixture["checkpoint"]), "--num-cpus", str(num_cpus)]
    return [sys.executable, "pipelines/evaluate.py", "--checkpoint", str(fixture["checkpoint"]),
            "--test-set", str(fixture["test_set"]), "--out", str(out), "--num-cpus", str(num_cpus)]


def import_summary(stderr: str) -> dict[str, float]:
    """-X importtime output -> seconds: "all" (every import of the process) and, for each of
    HEAVY_IMPORTS the process loaded, the time spent in its own modules (the self times of the
    package and its submodules; a submodule of two listed packages counts for the longer name,
    so ray.data's time is not ray's; what a package imports from others counts for those)."""
    seconds: dict[str, float] = {"all": 0.0}
    by_length = sorted(HEAVY_IMPORTS, key=len, reverse=True)
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        if not self_us.strip().isdigit():  # the header line
            continue
        seconds["all"] += int(self_us) / 1e6
        name = name.strip()
        package = next((p for p in by_length if name == p or name.startswith(p + ".")), None)
        if package is not None:
            seconds[package] = seconds.get(package, 0.0) + int(self_us) / 1e6
    return seconds


def import_times(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """Run `cmd` (a python command) once under -X importtime; its driver's import_summary."""
    done = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return import_summary(done.stderr)


def rows_of(before: Path | None, keys: tuple[str, ...] = tuple(ROW_NAMES)) -> dict[str, tuple[Path, dict[str, str]]]:
    """Row name -> (working directory, extra environment) for the rows `keys`: after, and the
    --before checkout's ("...b")."""
    checkouts = {"": (REPO, {})}
    if before is not None:
        checkouts["b"] = (before, {"PYTHONPATH": str(before)})
    return {f"{key}{suffix}": where for suffix, where in checkouts.items() for key in keys}


def bench(work: Path, fixture: dict[str, Path], num_cpus: int, rounds: int, before: Path | None,
          keys: tuple[str, ...] = tuple(ROW_NAMES)) -> tuple[dict[str, list[float]], dict[str, list[float]],
                                                             list[float], dict[str, dict[str, float]]]:
    """Every row of `keys` `rounds` times (fresh rows first, then the joined ones on one running
    head per round), alternating the order; returns (wall s, CPU s per row, load averages, import
    seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_DISABLE_USAGE_STATS": "1"}
    head_env = env | {"RAY_AUTH_MODE": "token"}
    rows = rows_of(before, keys)
    wall: dict[str, list[float]] = {key: [] for key in rows}
    cpu: dict[str, list[float]] = {key: [] for key in rows}
    loads: list[float] = []
    imports: dict[str, dict[str, float]] = {}
    runs = 0

    def cmd_of(key: str) -> list[str]:
        nonlocal runs
        runs += 1  # a fresh output folder for every run: the commands refuse one in use
        return command(key.removesuffix("b"), fixture, work / "runs" / f"{runs:04d}", num_cpus)

    def timed(key: str, r: int, cmd_env: dict[str, str], also: int | None = None) -> None:
        cwd, extra = rows[key]
        seconds, cpu_seconds, load = timed_process(cmd_of(key), cwd, cmd_env | extra, also=also)
        wall[key].append(seconds)
        cpu[key].append(cpu_seconds)
        loads.append(load)
        print(f"round {r + 1} {key}: {seconds:.2f} s, {cpu_seconds:.2f} CPU s (load {load:.2f})", flush=True)

    for r in range(rounds):
        order = list(rows) if r % 2 == 0 else list(reversed(rows))
        for key in [k for k in order if k.removesuffix("b") not in JOINED]:
            timed(key, r, env)
        if not any(k.removesuffix("b") in JOINED for k in rows):  # no head needed; R0 uses no Ray
            if r == 0:
                for key, (cwd, extra) in rows.items():
                    if key.removesuffix("b") == "R0":
                        imports[key] = import_times(cmd_of(key), cwd, env | extra)
            continue
        with running_head(num_cpus, work, head_env, cmd_of("R1")) as (address, head_pid):
            joined_env = head_env | {"RAY_ADDRESS": address}
            if r == 0:
                for key, (cwd, extra) in rows.items():
                    if key.removesuffix("b") in ("R0", "R1J", "EJ"):
                        imports[key] = import_times(cmd_of(key), cwd, joined_env | extra)
            for key in [k for k in order if k.removesuffix("b") in JOINED]:
                timed(key, r, joined_env, also=head_pid)
    return wall, cpu, loads, imports


def print_tables(wall: dict[str, list[float]], cpu: dict[str, list[float]], loads: list[float],
                 imports: dict[str, dict[str, float]], before: Path | None, num_cpus: int, rounds: int) -> None:
    def name(key: str) -> str:
        return ROW_NAMES[key.removesuffix("b")] + (", before" if key.endswith("b") else "")

    print(f"\nstart-up as whole processes: {num_cpus} CPUs for Ray; {rounds} round(s); 1-min load average before a "
          f"run: {min(loads):.2f}-{max(loads):.2f}" + (f"; before = {before}" if before else ""))
    print(f"| {'command':<58} | {'best s':>7} | {'median s':>8} | {'worst s':>7} | {'CPU s (best)':>12} "
          f"| {'CPU s (median)':>14} |")
    print(f"|{'-' * 60}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 14}|{'-' * 16}|")
    for key in wall:
        print(f"| {name(key):<58} | {min(wall[key]):7.2f} | {statistics.median(wall[key]):8.2f} | "
              f"{max(wall[key]):7.2f} | {min(cpu[key]):12.2f} | {statistics.median(cpu[key]):14.2f} |")
    print("\ndriver imports (python -X importtime, seconds: all, and each package's own modules; '-': not "
          "imported; R1J/EJ: the R1/E command joined to the running Ray):")
    print(f"| {'command':<58} | {'all':>6} | " + " | ".join(f"{p:>10}" for p in HEAVY_IMPORTS) + " |")
    print(f"|{'-' * 60}|{'-' * 8}|" + "|".join("-" * 12 for _ in HEAVY_IMPORTS) + "|")
    for key, seconds in imports.items():
        cells = " | ".join(f"{seconds[p]:10.2f}" if p in seconds else f"{'-':>10}" for p in HEAVY_IMPORTS)
        print(f"| {name(key):<58} | {seconds['all']:6.2f} | {cells} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of every Ray the commands start")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the tiny city's training images only (for a test)")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout whose commands run as rows of their own (PYTHONPATH=CHECKOUT)")
    parser.add_argument("--rows", default=",".join(ROW_NAMES),
                        help=f"comma-separated rows to run, of {', '.join(ROW_NAMES)}")
    args = parser.parse_args(argv)
    keys = tuple(k.strip() for k in args.rows.split(",") if k.strip())
    if not keys or set(keys) - set(ROW_NAMES):
        parser.error(f"--rows: expected some of {', '.join(ROW_NAMES)}, got {args.rows!r}")
    from placeforge.raysession import running_local_ray

    if running_local_ray():
        parser.error("a Ray is running on this machine (/tmp/ray/ray_current_cluster): the 'fresh Ray' rows "
                     "would join it; stop it or run elsewhere")
    work = args.work or Path(tempfile.mkdtemp(prefix="pf-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_DISABLE_USAGE_STATS": "1"}
    try:
        fixture = make_fixture(work, args.quick, args.num_cpus, env)
        before = args.before.resolve() if args.before else None
        wall, cpu, loads, imports = bench(work, fixture, args.num_cpus, args.rounds, before, keys)
        print_tables(wall, cpu, loads, imports, before, args.num_cpus, args.rounds)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
