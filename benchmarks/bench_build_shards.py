"""Shard-building throughput: plain loop vs. naive ShardWriter loop vs. build_shards on local Ray.

    .venv/bin/python benchmarks/bench_build_shards.py [--work DIR] [--num-cpus 2] [--width 640 --height 480]
    .venv/bin/python benchmarks/bench_build_shards.py --parts whole --rounds 3 --before /tmp/old-checkout

In one process (issue 2):
(a) limit: one process decoding, resizing and re-encoding every image in a loop
(b) naive: the same loop feeding webdataset.ShardWriter (one sample per image)
(c) placeforge: shards.build.build on a local Ray with --num-cpus CPUs (ingest, planning and
    assembly included), once with cold Ray workers and once more with warm ones
Goals (issue 2): (c) >= 1.6 x (b), and (c) per core >= 0.8 x (a).

As whole processes (issue 14), interpreter start, imports and Ray start-up included:
(B) `python <this script> --naive-into OUT --source DIR`: loop (b) as a command of its own
(C) `python pipelines/build_shards.py --source atname:DIR --out OUT --num-cpus N`, BuildConfig defaults,
    on a Ray it starts itself (no $RAY_ADDRESS); with --before CHECKOUT also the same command of
    that checkout (e.g. a `git worktree` of the old code), run with PYTHONPATH=CHECKOUT
(J) the same command on a Ray that is already running (`ray start --head --num-cpus N`) and has
    run one build before (the same command into another --out), joined through $RAY_ADDRESS as
    `ray job submit` does: what a user who keeps a Ray up pays per job.  The head's start and
    that first build are outside the time; the head's workers' CPU during the command is counted
Each round runs every command once, in an order that alternates between rounds, so a change in
the machine's load falls on all of them; best and median of the rounds are printed, and the CPU
seconds of each command's whole process tree (Ray's processes included), which other jobs on
the machine change far less than the wall clock.
Goal (issue 14): (C) >= 1.6 x (B); (J) is the same build without Ray's own start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import webdataset as wds

from placeforge.imaging import reencode_jpeg
from placeforge.places import PlaceConfig

# Only what the naive loop needs is imported at the top: row (B) runs this file as its own process.

REPO = Path(__file__).resolve().parents[1]


def make_dataset(work: Path, width: int, height: int, places: int) -> Path:
    """The synthetic city's training images: `places` x 4 headings x 6 captures (24 a place)."""
    from synthcity import generate
    from synthcity.synth_config import SynthConfig

    cfg = SynthConfig(
        train_places=places, test_places=8, queries=8, val_places=0, gsv_places=4, gsv_images_per_place=4,
        width=width, height=height,
    )
    generate(work / "city", cfg)
    return work / "city" / "atname" / "train"


def list_images(source: Path) -> list[str]:
    return sorted(entry.path for entry in os.scandir(source) if entry.name.endswith(".jpg") and entry.is_file())


def naive_process(source: Path, out: Path, short_side: int) -> None:
    """(B): the naive loop as a command of its own (its imports are part of what it costs)."""
    bench_shardwriter(list_images(source), short_side, out)


def bench_loop(paths: list[str], short_side: int) -> float:
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            reencode_jpeg(f.read(), short_side)
    return time.perf_counter() - started


def bench_shardwriter(paths: list[str], short_side: int, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with wds.ShardWriter(str(out / "naive-%06d.tar"), maxcount=400, verbose=0) as sink:
        for i, path in enumerate(paths):
            with open(path, "rb") as f:
                encoded = reencode_jpeg(f.read(), short_side)
            sink.write({"__key__": f"i{i:09d}", "jpg": encoded.jpeg, "txt": path})
    return time.perf_counter() - started


def bench_ray(source: Path, out: Path, num_cpus: int, short_side: int) -> tuple[float, float]:
    """(cold, warm) seconds: the first build pays for Ray worker processes starting and
    importing Ray Data and the task modules (a fixed few seconds per job); the second, an --overwrite
    rebuild in the same Ray session, shows the steady-state rate a long job runs at."""
    import ray

    from placeforge.shards.build import BuildConfig, build

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        cfg = BuildConfig(short_side=short_side, images_per_shard=200, min_shards=4 * num_cpus,
                          places=PlaceConfig(min_images_per_place=1))
        times = []
        for _ in range(2):
            started = time.perf_counter()
            build([("atname", source)], out, cfg, overwrite=True)
            times.append(time.perf_counter() - started)
        return times[0], times[1]
    finally:
        ray.shutdown()


def timed_process(cmd: list[str], cwd: Path, env: dict[str, str],
                  also: int | None = None) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, 1-minute load average just before) of one command, which must succeed.

    CPU seconds: user + system of the command and every process under it (Ray's GCS, raylet,
    agents and workers), each process's last sample taken every 50 ms while it lives, so a few
    tens of ms per process are missed.  Other jobs on the machine slow the wall clock, hardly this.
    `also`: the pid of another process tree (a running Ray head, whose workers run the command's
    tasks): what its processes spend while the command runs is counted too.
    """
    import psutil

    def tree(pid: int) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        return []

    def sample(pid: int, into: dict) -> None:
        for proc in tree(pid):
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                into[(proc.pid, proc.create_time())] = times.user + times.system

    before: dict = {}
    if also is not None:
        sample(also, before)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu: dict = {}
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(process.stderr.read()))  # a full pipe would block it
    reader.start()
    while process.poll() is None:
        sample(process.pid, cpu)
        if also is not None:
            sample(also, cpu)
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if also is not None:
        sample(also, cpu)
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({process.returncode}):\n{stderr[0][-3000:]}")
    return seconds, sum(value - before.get(key, 0.0) for key, value in cpu.items()), load


@contextlib.contextmanager
def running_head(num_cpus: int, work: Path, env: dict[str, str], warm_up: list[str]):
    """A Ray head (`ray start --head --block`) on 127.0.0.1 for row (J) that has run `warm_up` (a
    command, given the head's address in $RAY_ADDRESS); yields (GCS address, pid).

    Its own ports and a short temp dir, so it neither collides with nor is joined by another
    Ray on the machine; stopped by killing its process group (never `ray stop`, which would
    stop every Ray here).  Ray 2.60 wants token auth for a head started this way.
    """
    import signal
    import socket

    from placeforge.raysession import free_port

    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="pfh-", dir="/tmp"))  # short: Ray's socket paths
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
           "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    with open(work / "head.log", "wb") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up; see {work / 'head.log'}")
            time.sleep(0.2)
        address = f"127.0.0.1:{port}"
        # The first job on a Ray also starts Ray Data's detached actors (stats, autoscaling
        # coordinator, usage) and its first workers: a later job finds them running.
        subprocess.run(warm_up, cwd=REPO, env=env | {"RAY_ADDRESS": address}, check=True, capture_output=True)
        time.sleep(2)
        yield address, head.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def bench_whole_processes(source: Path, work: Path, num_cpus: int, short_side: int, rounds: int,
                          before: Path | None) -> None:
    """Rows (B) and (C) [and (C) of the --before checkout], `rounds` times each, alternating."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_DISABLE_USAGE_STATS": "1"}
    n = len(list_images(source))
    build_args = ["--source", f"atname:{source}", "--num-cpus", str(num_cpus), "--short-side", str(short_side)]
    commands = {"B": ([sys.executable, str(Path(__file__).resolve()), "--naive-into", str(work / "naive-proc"),
                       "--source", str(source), "--short-side", str(short_side)], REPO, env, work / "naive-proc")}
    commands["C"] = ([sys.executable, "pipelines/build_shards.py", *build_args, "--out", str(work / "set-after")],
                     REPO, env, work / "set-after")
    if before is not None:
        commands["C0"] = ([sys.executable, "pipelines/build_shards.py", *build_args, "--out", str(work / "set-before")],
                          before, env | {"PYTHONPATH": str(before)}, work / "set-before")
    commands["J"] = ([sys.executable, "pipelines/build_shards.py", *build_args, "--out", str(work / "set-joined")],
                     REPO, env | {"RAY_AUTH_MODE": "token"}, work / "set-joined")
    times: dict[str, list[float]] = {key: [] for key in commands}
    cpu: dict[str, list[float]] = {key: [] for key in commands}
    loads: list[float] = []
    for r in range(rounds):
        order = list(commands) if r % 2 == 0 else list(reversed(commands))
        for key in order:
            cmd, cwd, cmd_env, out = commands[key]
            shutil.rmtree(out, ignore_errors=True)  # every build starts from an empty --out
            if key == "J":
                warm_up = [*cmd[:-1], str(work / "set-joined-first"), "--overwrite"]
                with running_head(num_cpus, work, cmd_env, warm_up) as (address, head_pid):
                    seconds, cpu_seconds, load = timed_process(cmd, cwd, cmd_env | {"RAY_ADDRESS": address},
                                                               also=head_pid)
            else:
                seconds, cpu_seconds, load = timed_process(cmd, cwd, cmd_env)
            times[key].append(seconds)
            cpu[key].append(cpu_seconds)
            loads.append(load)
            print(f"round {r + 1} {key}: {seconds:.2f} s, {cpu_seconds:.2f} CPU s (load {load:.2f})", flush=True)
    names = {"B": "(B) naive ShardWriter loop, whole process", "C": "(C) build_shards.py, whole process",
             "C0": f"(C) build_shards.py of {before}", "J": "(J) build_shards.py, a later job on a running Ray"}
    print(f"\nwhole processes: {n} images -> short side {short_side}; {num_cpus} CPUs for Ray; {rounds} rounds; "
          f"1-min load average before a run: {min(loads):.2f}-{max(loads):.2f}")
    print(f"| {'command':<58} | {'best s':>7} | {'median s':>8} | {'worst s':>7} | {'images/s (best)':>15} "
          f"| {'CPU s (median)':>14} |")
    print(f"|{'-' * 60}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 17}|{'-' * 16}|")
    for key, values in times.items():
        print(f"| {names[key]:<58} | {min(values):7.2f} | {statistics.median(values):8.2f} | {max(values):7.2f} | "
              f"{n / min(values):15.1f} | {statistics.median(cpu[key]):14.2f} |")
    for key in [k for k in ("C", "C0", "J") if k in times]:
        best = min(times["B"]) / min(times[key])
        median = statistics.median(times["B"]) / statistics.median(times[key])
        print(f"{names[key]} / (B): best {best:.2f}, median {median:.2f} (goal >= 1.6; 2.0 is {num_cpus} cores)")
    if before is not None:
        after_shards = json.loads((work / "set-after" / "manifest.json").read_text())["shards"]
        before_shards = json.loads((work / "set-before" / "manifest.json").read_text())["shards"]
        same = [s["sha256"] for s in after_shards] == [s["sha256"] for s in before_shards]
        print(f"shards of both checkouts byte-identical: {'yes' if same else 'NO'} ({len(after_shards)} shards)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--places", type=int, default=209, help="train places; 24 images each (5,016 images)")
    parser.add_argument("--source", type=Path, default=None,
                        help="a folder of @-named JPEGs to use instead of generating the synthetic city")
    parser.add_argument("--parts", default="in-process,whole", help="in-process, whole, or both (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the whole-process commands")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout (e.g. `git worktree add /tmp/old HEAD~1`) whose build_shards.py "
                        "runs as a row of its own in the whole-process rounds")
    parser.add_argument("--naive-into", type=Path, default=None, help=argparse.SUPPRESS)  # row (B)'s own process
    args = parser.parse_args()
    if args.naive_into is not None:
        naive_process(args.source, args.naive_into, args.short_side)
        return
    parts = set(args.parts.split(","))
    if not parts or parts - {"in-process", "whole"}:
        parser.error(f"--parts: expected in-process, whole or both, got {args.parts!r}")
    work = args.work or Path(tempfile.mkdtemp(prefix="pf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = args.source.resolve() if args.source else make_dataset(work, args.width, args.height, args.places)
    if "whole" in parts:
        bench_whole_processes(source, work, args.num_cpus, args.short_side, args.rounds,
                              args.before.resolve() if args.before else None)
    if "in-process" in parts:
        bench_in_process(source, work, args)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def bench_in_process(source: Path, work: Path, args: argparse.Namespace) -> None:
    """Rows (a), (b) and (c) of issue 2, in this process."""
    from placeforge.ingest import read_source


    paths = read_source("atname", source).catalog.column("path").to_pylist()
    n = len(paths)
    bench_loop(paths[:50], args.short_side)  # warm the page cache and PIL
    t_a = bench_loop(paths, args.short_side)
    t_b = bench_shardwriter(paths, args.short_side, work / "naive")
    t_c, t_w = bench_ray(source, work / "shards", args.num_cpus, args.short_side)
    rate = {"a": n / t_a, "b": n / t_b, "c": n / t_c, "w": n / t_w}
    print(f"\nin one process: {n} images -> short side {args.short_side}; "
          f"{platform.processor() or platform.machine()}, {args.num_cpus} CPUs for Ray")
    print(f"| {'method':<48} | {'seconds':>8} | {'images/s':>9} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 11}|")
    print(f"| {'(a) limit: plain decode/resize/encode loop':<48} | {t_a:8.2f} | {rate['a']:9.1f} |")
    print(f"| {'(b) naive: same loop into wds.ShardWriter':<48} | {t_b:8.2f} | {rate['b']:9.1f} |")
    print(f"| {'(c) build_shards, local Ray, cold workers':<48} | {t_c:8.2f} | {rate['c']:9.1f} |")
    print(f"| {'(c) build_shards, local Ray, warm workers':<48} | {t_w:8.2f} | {rate['w']:9.1f} |")
    for label, key in (("cold", "c"), ("warm", "w")):
        print(f"{label}: (c)/(b) = {rate[key] / rate['b']:.2f} (goal >= 1.6); "
              f"(c) per core / (a) = {rate[key] / args.num_cpus / rate['a']:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
