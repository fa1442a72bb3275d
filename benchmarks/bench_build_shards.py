"""Shard-building throughput: plain loop vs. naive ShardWriter loop vs. build_shards on local Ray.

    .venv/bin/python benchmarks/bench_build_shards.py [--work DIR] [--num-cpus 2] [--width 640 --height 480]

(a) limit: one process decoding, resizing and re-encoding every image in a loop
(b) naive: the same loop feeding webdataset.ShardWriter (one sample per image)
(c) placeforge: shards.build.build on a local Ray with --num-cpus CPUs (ingest, planning and
    assembly included), once with cold Ray workers and once more with warm ones
Goals (issue 2): (c) >= 1.6 x (b), and (c) per core >= 0.8 x (a).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import webdataset as wds

from placeforge.imaging import reencode_jpeg
from placeforge.ingest import read_source
from shards.build import BuildConfig, build
from synthcity import generate
from synthcity.synth_config import SynthConfig


def make_dataset(work: Path, width: int, height: int, places: int) -> Path:
    cfg = SynthConfig(
        train_places=places, test_places=8, queries=8, gsv_places=4, gsv_images_per_place=4, width=width, height=height
    )
    generate(work / "city", cfg)
    return work / "city" / "atname" / "train"


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
    importing torch/webdataset (a fixed few seconds per job); the second, an --overwrite
    rebuild in the same Ray session, shows the steady-state rate a long job runs at."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        cfg = BuildConfig(short_side=short_side, images_per_shard=200, min_shards=4 * num_cpus, min_images_per_place=1)
        times = []
        for _ in range(2):
            started = time.perf_counter()
            build([("atname", source)], out, cfg, overwrite=True)
            times.append(time.perf_counter() - started)
        return times[0], times[1]
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--places", type=int, default=800, help="train places; 8 images each")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pf-bench-"))
    source = make_dataset(work, args.width, args.height, args.places)
    paths = read_source("atname", source).catalog.column("path").to_pylist()
    n = len(paths)
    bench_loop(paths[:50], args.short_side)  # warm the page cache and PIL
    t_a = bench_loop(paths, args.short_side)
    t_b = bench_shardwriter(paths, args.short_side, work / "naive")
    t_c, t_w = bench_ray(source, work / "shards", args.num_cpus, args.short_side)
    rate = {"a": n / t_a, "b": n / t_b, "c": n / t_c, "w": n / t_w}
    print(f"\n{n} images {args.width}x{args.height} -> short side {args.short_side}; "
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
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
