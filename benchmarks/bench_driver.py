"""The shard build's driver work at scale, without images: ingest, places and plan of millions of rows.

    .venv/bin/python benchmarks/bench_driver.py [--rows 500000,1000000,2000000,5500000] [--work DIR]
    .venv/bin/python benchmarks/bench_driver.py --quick        # a few thousand rows: a smoke test

For each size it generates, in --work (default: a temp dir), two file-list sources whose
images do not exist:

  atname      a Parquet file list of SF-XL-style "@" names (12 crops per panorama, 30 degrees
              apart, in six cities over five UTM zones and both hemispheres); a few per cent are
              UTM-only names, listed twice, malformed, NaN coordinates or not images
  gsv_cities  Dataframes/<City>.csv rows (4-20 images per place) and a Parquet list of their
              Images/ paths, with a few rows whose image is not listed and listed files no row names

then runs `shards.build.build(..., plan_only=True)` on both in a fresh Python process per size
(so peak memory does not carry over) and prints one table row per size: seconds per phase,
the build's total, the process's peak RSS and microseconds per row.  Rows = listed paths +
CSV rows, i.e. the build's inputs.  Goal (issue 14): 5.5 M rows in <= 60 s and <= 4 GiB, linear.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
FULL_SIZES = (500_000, 1_000_000, 2_000_000, 5_500_000)
QUICK_SIZES = (2_000, 4_000)
CROPS_PER_PANO = 12  # SF-XL's processed images: 12 crops of each panorama, 30 degrees apart
PANOS_PER_CELL = 0.8  # panoramas per 15 m x 15 m cell: sets the area, so density is the same at every size
# (name, UTM zone and hemisphere implied by lat/lon, share of the atname rows)
AT_CITIES = (
    ("sf", 37.76, -122.45, 0.60),  # 10S
    ("tokyo", 35.68, 139.76, 0.10),  # 54S
    ("sydney", -33.87, 151.21, 0.10),  # 56H, southern
    ("saopaulo", -23.55, -46.63, 0.08),  # 23K, southern
    ("london", 51.51, -0.13, 0.07),  # 30U
    ("buenosaires", -34.60, -58.38, 0.05),  # 21H, southern
)
GSV_CITIES = (("Boston", 42.36, -71.06), ("Melbourne", -37.81, 144.96), ("Bangkok", 13.75, 100.50),
              ("Lisbon", 38.72, -9.14))  # fmt: skip
_ALPHABET = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8)


def random_ids(rng: np.random.Generator, n: int, length: int = 22) -> pl.Series:
    """[n] random panorama ids of `length` characters of [A-Za-z0-9_-], as Street View writes them."""
    codes = _ALPHABET[rng.integers(0, len(_ALPHABET), size=(n, length))]
    return pl.Series(codes.view(f"S{length}").reshape(-1)).cast(pl.String)


def fixed(value: pl.Expr, decimals: int, int_digits: int) -> pl.Expr:
    """`value` as text with `decimals` decimals and at least `int_digits` integer digits ("-037.77510")."""
    scaled = (value.abs() * 10**decimals).round(0).cast(pl.Int64)
    whole = (scaled // 10**decimals).cast(pl.String).str.zfill(int_digits)
    frac = (scaled % 10**decimals).cast(pl.String).str.zfill(decimals)
    return pl.when(value < 0).then(pl.lit("-")).otherwise(pl.lit("")) + whole + "." + frac


def scatter_latlon(rng: np.random.Generator, lat_deg: float, lon_deg: float, n: int,
                   side_m: float) -> tuple[np.ndarray, np.ndarray]:
    """[n] points uniform in a `side_m` square around (lat, lon), in degrees (through UTM, so exact)."""
    from placeforge.geo import latlon_to_utm, utm_to_latlon

    centre = latlon_to_utm(np.array([lat_deg]), np.array([lon_deg]))
    east = centre.east_m[0] + rng.uniform(-side_m / 2, side_m / 2, n)
    north = centre.north_m[0] + rng.uniform(-side_m / 2, side_m / 2, n)
    lat, lon, _ = utm_to_latlon(east, north, np.full(n, centre.zone_number[0]), np.full(n, lat_deg >= 0))
    return lat, lon


def atname_rows(rng: np.random.Generator, n_rows: int) -> pl.DataFrame:
    """`n_rows` listed relpaths "train/<city>/@...@.jpg" of 12 crops per panorama (90 %) or 1-3 (10 %)."""
    frames = []
    for city, lat0, lon0, share in AT_CITIES:
        panos = max(1, round(1.1 * n_rows * share / (0.9 * CROPS_PER_PANO + 0.1 * 2)))  # 10 % spare, cut below
        side_m = float(np.sqrt(panos / PANOS_PER_CELL) * 15.0)
        lat, lon = scatter_latlon(rng, lat0, lon0, panos, side_m)
        crops = np.where(rng.random(panos) < 0.9, CROPS_PER_PANO, rng.integers(1, 4, panos))
        pano = pl.DataFrame({
            "lat": lat, "lon": lon, "crops": crops, "pano_id": random_ids(rng, panos),
            "month": rng.integers(2009, 2022, panos) * 100 + rng.integers(1, 13, panos),
        })  # fmt: skip
        rows = pano.with_columns(crop=pl.int_ranges(0, "crops")).explode("crop")
        frames.append(rows.with_columns(city=pl.lit(city), heading=pl.col("crop") * 30))
    rows = pl.concat(frames)
    from placeforge.geo import latlon_to_utm

    utm = latlon_to_utm(rows["lat"].to_numpy(), rows["lon"].to_numpy())
    rows = rows.with_columns(east=utm.east_m, north=utm.north_m, zone=utm.zone_number,
                             letter=pl.Series(utm.zone_letter.astype(object), dtype=pl.String))
    kind = rng.random(rows.height)
    utm_only = pl.Series(kind < 0.01)  # no lat/lon: the UTM fields are converted
    name = pl.concat_str(
        pl.lit("@"), fixed(pl.col("east"), 2, 7), pl.lit("@"), fixed(pl.col("north"), 2, 7),
        pl.lit("@"), pl.col("zone").cast(pl.String), pl.lit("@"), pl.col("letter"),
        pl.lit("@"), pl.when(utm_only).then(pl.lit("")).otherwise(fixed(pl.col("lat"), 5, 3)),
        pl.lit("@"), pl.when(utm_only).then(pl.lit("")).otherwise(fixed(pl.col("lon"), 5, 3)),
        pl.lit("@"), pl.col("pano_id"), pl.lit("@@"), pl.col("heading").cast(pl.String), pl.lit("@@@@"),
        pl.col("month").cast(pl.String), pl.lit("@@.jpg"),
    )  # fmt: skip
    # A few per cent of bad inputs, each of a kind the readers reject for its own reason.
    bad = (
        pl.when(pl.Series(kind >= 0.995)).then(pl.concat_str(name.str.head(-4), pl.lit(".txt")))  # not_an_image
        .when(pl.Series(kind >= 0.99)).then(name.str.replace(r"^@[^@]*@[^@]*@", "@abc@"))  # bad_name: field count
        .when(pl.Series(kind >= 0.985)).then(name.str.replace(r"^@[^@]*@", "@12x4@"))  # bad_name: not a number
        .when(pl.Series(kind >= 0.98)).then(name.str.replace(  # bad_coordinates
            r"^@[^@]*@[^@]*@([^@]*)@([^@]*)@[^@]*@[^@]*@", "@nan@nan@${1}@${2}@nan@nan@"))
        .otherwise(name)
    )
    relpath = pl.concat_str(pl.lit("train/"), pl.col("city"), pl.lit("/"), bad)
    listed = rows.select(path=relpath)
    # ~2 % listed twice (a list concatenated from overlapping crawls): duplicate
    again = listed.sample(fraction=0.02, seed=int(rng.integers(1 << 31)))
    return pl.concat([listed, again]).sample(fraction=1.0, shuffle=True, seed=int(rng.integers(1 << 31))).head(n_rows)


def gsv_rows(rng: np.random.Generator, n_rows: int) -> tuple[dict[str, pl.DataFrame], pl.DataFrame]:
    """({City: CSV rows}, file list of their Images/ paths): ~`n_rows` rows, 4-20 images per place."""
    csvs, listed = {}, []
    for city, lat0, lon0 in GSV_CITIES:
        places = max(1, n_rows // len(GSV_CITIES) // 12)
        lat, lon = scatter_latlon(rng, lat0, lon0, places, float(np.sqrt(places) * 60.0))
        per_place = rng.integers(4, 21, places)
        place = pl.DataFrame({"place_id": np.arange(places), "lat": lat, "lon": lon, "n": per_place})
        rows = place.with_columns(i=pl.int_ranges(0, "n")).explode("i")
        m = rows.height
        rows = rows.with_columns(
            year=pl.Series(rng.integers(2007, 2022, m)), month=pl.Series(rng.integers(1, 13, m)),
            northdeg=pl.Series(rng.integers(0, 360, m)), city_id=pl.lit(city),
            lat=fixed(pl.col("lat") + pl.Series(rng.normal(0, 5e-5, m)), 6, 1),
            lon=fixed(pl.col("lon") + pl.Series(rng.normal(0, 5e-5, m)), 6, 1),
            panoid=random_ids(rng, m),
        )  # fmt: skip
        csv = rows.select("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
        path = pl.concat_str(
            pl.lit(f"Images/{city}/{city}_"), pl.col("place_id").cast(pl.String).str.zfill(7), pl.lit("_"),
            pl.col("year").cast(pl.String), pl.lit("_"), pl.col("month").cast(pl.String).str.zfill(2), pl.lit("_"),
            pl.col("northdeg").cast(pl.String).str.zfill(3), pl.lit("_"), pl.col("lat"), pl.lit("_"),
            pl.col("lon"), pl.lit("_"), pl.col("panoid"), pl.lit(".jpg"),
        )  # fmt: skip
        paths = csv.select(path=path)
        keep = pl.Series(rng.random(m) >= 0.005)  # ~0.5 % of rows name an image the list lacks: missing_file
        extra = paths.sample(fraction=0.005, seed=int(rng.integers(1 << 31))).with_columns(
            path=pl.col("path").str.replace(r"\.jpg$", "_extra.jpg"))  # no row names these: not_in_metadata
        csvs[city] = csv
        listed += [paths.filter(keep), extra]
    return csvs, pl.concat(listed)


def generate(work: Path, n_rows: int, gsv_fraction: float, seed: int) -> list[tuple[str, Path, Path]]:
    """Write the two sources for ~`n_rows` inputs into `work`; returns them as (format, root, list)."""
    rng = np.random.default_rng(seed)
    n_gsv = round(n_rows * gsv_fraction)
    at_root, gsv_root = work / "sf_xl" / "processed", work / "gsv_cities"
    at_root.mkdir(parents=True, exist_ok=True)
    at_list = work / "sf_xl_files.parquet"
    atname_rows(rng, n_rows - n_gsv).write_parquet(at_list)
    csvs, gsv_listed = gsv_rows(rng, n_gsv)
    (gsv_root / "Images").mkdir(parents=True, exist_ok=True)
    (gsv_root / "Dataframes").mkdir(parents=True, exist_ok=True)
    for city, csv in csvs.items():
        csv.write_csv(gsv_root / "Dataframes" / f"{city}.csv")
    gsv_list = work / "gsv_files.parquet"
    gsv_listed.write_parquet(gsv_list)
    return [("atname", at_root, at_list), ("gsv_cities", gsv_root, gsv_list)]


def measure(sources: list[tuple[str, Path, Path]], out: Path) -> dict:
    """Plan-only build of `sources` into `out` in this process; phase seconds, counts and peak RSS."""
    from placeforge.shards.build import BuildConfig, build

    started, cpu_started = time.perf_counter(), time.process_time()
    summary = build(sources, out, BuildConfig(), plan_only=True)
    total_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "inputs": summary.record.counts["inputs"],
        "planned": summary.record.counts["planned"],
        "rejected": summary.record.counts["rejected"],
        "phases": summary.phase_seconds,
        "total_s": total_s,
        "cpu_s": cpu_s,  # all threads of the process: > total_s where polars ran in parallel
        "peak_rss_bytes": peak_rss_bytes(),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set: /proc's VmHWM where there is one (Linux).

    Not ru_maxrss: Linux keeps a process's ru_maxrss across fork + exec, so a child started by
    a parent holding the generated rows (~4 GiB at 5.5 M) reported the parent's peak, not its own.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_size(work: Path, n_rows: int, gsv_fraction: float, seed: int) -> dict:
    folder = work / f"rows-{n_rows}"
    shutil.rmtree(folder, ignore_errors=True)
    sources = generate(folder, n_rows, gsv_fraction, seed)
    spec = json.dumps({"sources": [[f, str(r), str(lst)] for f, r, lst in sources], "out": str(folder / "out")})
    # A fresh process per size: imports are counted in its RSS, not in the build's seconds.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--measure", spec], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(folder, ignore_errors=True)
    return result


PHASES = ("ingest", "places", "plan", "write")


def table(results: list[dict]) -> str:
    head = ["rows", "ingest s", "places s", "plan s", "write s", "total s", "CPU s", "peak RSS GiB", "us/row"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in results:
        cells = [f"{r['inputs']:,}", *(f"{r['phases'][p]:.2f}" for p in PHASES), f"{r['total_s']:.2f}",
                 f"{r['cpu_s']:.2f}", f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{r['total_s'] / r['inputs'] * 1e6:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--rows", default=",".join(str(n) for n in FULL_SIZES),
                        help="comma-separated input counts, one table row each")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}: a smoke test")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--gsv-fraction", type=float, default=0.1, help="share of the rows that are GSV-Cities rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(measure([tuple(s) for s in spec["sources"]], Path(spec["out"]))))
        return 0
    sizes = QUICK_SIZES if args.quick else tuple(int(n) for n in args.rows.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="pf-bench-driver-"))
    try:
        results = []
        for n in sizes:
            results.append(run_size(work, n, args.gsv_fraction, args.seed))
            print(f"{n:,} rows: {results[-1]['total_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"plan-only build (BuildConfig defaults), {platform.machine()}, {len(sizes)} sizes, "
          f"GSV-Cities share {args.gsv_fraction:.0%}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
