"""Write the synthetic city to disk in the `@` and GSV-Cities layouts, in parallel, atomically.

    DIR/atname/train/@...@.jpg
    DIR/atname/test/database/@...@.jpg
    DIR/atname/test/queries/@...@.jpg
    DIR/atname/val/database/@...@.jpg      (a third city 5 km east: for tuning, not reporting)
    DIR/atname/val/queries/@...@.jpg
    DIR/gsv_cities/Dataframes/<City>.csv
    DIR/gsv_cities/Images/<City>/<City>_<place_id>_<year>_<month>_<northdeg>_<lat>_<lon>_<panoid>.jpg
    DIR/synth_manifest.json   (written last: its presence means the folder is complete)

Every file is written under a temporary name in its own folder and renamed into
place.  A run into a folder holding a complete manifest of the same config does
nothing; a different config is refused unless `overwrite`, which removes only
what this module writes.  An interrupted run (a `.synth_partial.json` of the same
config) resumes, skipping the images already there: a file exists only if whole.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from placeforge.config import from_mapping, to_dict
from placeforge.fileio import is_temp_name, write_bytes_atomic
from synthcity.camera import Camera
from synthcity.conditions import sample_appearance
from synthcity.naming import (
    GSV_CSV_HEADER,
    Origin,
    at_name,
    gsv_name,
    make_origin,
    northdeg,
    shifted_origin,
    short_id,
    to_global,
)
from synthcity.plan import AT, GSV, VAL, Shot, build_city, city_plans, plan_atname, plan_gsv, plan_val
from synthcity.render import render_view
from synthcity.synth_config import VAL_OFFSET_EAST_M, SynthConfig

FORMAT_VERSION = 1
MANIFEST_NAME = "synth_manifest.json"
PARTIAL_NAME = ".synth_partial.json"
TOP_NAMES = ("atname", "gsv_cities", MANIFEST_NAME, PARTIAL_NAME)  # what a dataset puts at the top of DIR
AT_DIRS = {
    "train": "atname/train",
    "test/database": "atname/test/database",
    "test/queries": "atname/test/queries",
    "val/database": "atname/val/database",
    "val/queries": "atname/val/queries",
}
# Pano id of each query split: queries get their own id, not their place's.
_QUERY_PANO_KEY = {"test/queries": "query", "val/queries": "val-query"}


class OutputDirError(RuntimeError):
    """The output folder holds something this run must not overwrite; the message says what to do."""


@dataclass(frozen=True)
class DatasetLayout:
    """Every file of the dataset, decided before any pixel is rendered."""

    jobs: list[tuple[Shot, str]]  # (shot, path relative to DIR)
    gsv_csv_relpath: str
    gsv_csv_text: str
    counts: dict[str, object]
    origins: dict[str, dict[str, object]]


def manifest_config(cfg: SynthConfig) -> dict[str, object]:
    """The config as recorded and compared: the worker count never changes a byte, so it is left out."""
    values = to_dict(cfg)
    values.pop("workers")
    return values


def val_origin(cfg: SynthConfig) -> Origin:
    """Origin of the val city: the @ origin moved VAL_OFFSET_EAST_M east, same UTM zone."""
    return shifted_origin(make_origin(cfg.at_origin_lat, cfg.at_origin_lon), VAL_OFFSET_EAST_M)


def at_jobs(cfg: SynthConfig, shots: list[Shot], origin: Origin) -> list[tuple[Shot, str]]:
    """(shot, `@` file path) of shots of one city placed at `origin`."""
    jobs: list[tuple[Shot, str]] = []
    east, north, lat, lon = to_global(origin, [s.x_m for s in shots], [s.y_m for s in shots])
    for k, shot in enumerate(shots):
        # Database and train images share an id per place, like panoramas; queries get their own.
        if shot.split in _QUERY_PANO_KEY:
            pano = short_id(10, cfg.seed, AT, _QUERY_PANO_KEY[shot.split], shot.index)
        else:  # "train", "test" or "val": one id per place of the district
            pano = short_id(10, cfg.seed, AT, shot.split.split("/")[0], shot.place)
        name = at_name(
            east[k], north[k], origin.zone, origin.letter, lat[k], lon[k], pano, shot.index, shot.heading_deg,
            shot.pitch_deg, shot.roll_deg, f"{shot.year}{shot.month:02d}", f"{shot.time}-{shot.weather}",
        )  # fmt: skip
        jobs.append((shot, f"{AT_DIRS[shot.split]}/{name}"))
    return jobs


def plan_dataset(cfg: SynthConfig) -> DatasetLayout:
    """All shots with their file names, the GSV CSV text, counts and origins (pure)."""
    plans = city_plans(cfg)
    at_shots, _, _ = plan_atname(cfg, build_city(cfg, plans[AT]), plans[AT])
    gsv_shots, gsv_places = plan_gsv(cfg, build_city(cfg, plans[GSV]), plans[GSV])
    at_origin, gsv_origin = make_origin(cfg.at_origin_lat, cfg.at_origin_lon), make_origin(cfg.gsv_origin_lat, cfg.gsv_origin_lon)
    jobs = at_jobs(cfg, at_shots, at_origin)

    city = cfg.gsv_city
    rows = [",".join(GSV_CSV_HEADER)]
    _, _, lat, lon = to_global(gsv_origin, [s.x_m for s in gsv_shots], [s.y_m for s in gsv_shots])
    for k, shot in enumerate(gsv_shots):
        lat_s, lon_s, deg = f"{lat[k]:.7f}", f"{lon[k]:.7f}", northdeg(shot.heading_deg)
        panoid = short_id(22, cfg.seed, GSV, shot.index)
        rows.append(f"{shot.place},{shot.year},{shot.month},{deg},{city},{lat_s},{lon_s},{panoid}")
        name = gsv_name(city, shot.place, shot.year, shot.month, deg, lat_s, lon_s, panoid)
        jobs.append((shot, f"gsv_cities/Images/{city}/{name}"))
    origins = {"atname": at_origin.as_dict(), "gsv_cities": {"city": city, **gsv_origin.as_dict()}}

    val_shots: list[Shot] = []
    if VAL in plans:  # val_places > 0
        val_shots, _ = plan_val(cfg, build_city(cfg, plans[VAL]), plans[VAL])
        origin = val_origin(cfg)
        jobs += at_jobs(cfg, val_shots, origin)
        origins["atname/val"] = origin.as_dict()

    names = [rel for _, rel in jobs]
    if len(set(names)) != len(names):
        raise AssertionError("two images were given the same file name")  # a planning bug, not a user error
    at_counts = {split: sum(s.split == split for s in at_shots + val_shots) for split in AT_DIRS}
    return DatasetLayout(
        jobs=jobs,
        gsv_csv_relpath=f"gsv_cities/Dataframes/{city}.csv",
        gsv_csv_text="\n".join(rows) + "\n",
        counts={
            "atname": at_counts,
            "gsv_cities": {city: {"places": len(gsv_places.xy_m), "images": len(gsv_shots)}},
            "total_images": len(jobs),
        },
        origins=origins,
    )


class ShotRenderer:
    """Renders shots and saves them as JPEG under `out_dir`; holds every city (built once per process)."""

    def __init__(self, cfg: SynthConfig, out_dir: Path) -> None:
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.cities = {layout: build_city(cfg, plan) for layout, plan in city_plans(cfg).items()}  # AT, GSV, VAL
        self.southern = {AT: cfg.at_origin_lat < 0, GSV: cfg.gsv_origin_lat < 0, VAL: cfg.at_origin_lat < 0}

    def render(self, shot: Shot) -> np.ndarray:
        """uint8 [height, width, 3] image of one shot."""
        c = self.cfg
        cam = Camera(shot.x_m, shot.y_m, shot.heading_deg, shot.pitch_deg, shot.roll_deg, c.camera_height_m, c.fov_deg, c.width, c.height)
        app = sample_appearance(shot.time, shot.weather, shot.month, self.southern[shot.layout], shot.hard, np.random.default_rng([shot.seed, 1]))
        return render_view(self.cities[shot.layout], cam, app, shot.seed)

    def __call__(self, job: tuple[Shot, str]) -> str:
        shot, relpath = job
        buffer = io.BytesIO()
        Image.fromarray(self.render(shot)).save(buffer, format="JPEG", quality=self.cfg.jpeg_quality)
        write_bytes_atomic(self.out_dir / relpath, buffer.getvalue())
        return relpath


# Per-process renderer of pool workers: built once by the initializer, so each task
# carries only a shot and a file name instead of two cities.
_WORKER: ShotRenderer | None = None


def _init_worker(cfg: SynthConfig, out_dir: str) -> None:
    global _WORKER
    _keep_freed_memory()
    _WORKER = ShotRenderer(cfg, Path(out_dir))


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    A render allocates and frees dozens of ~1 MB arrays; by default glibc hands
    them back (munmap / heap trim) and the next image faults every page in again,
    which cost about a seventh of the run time in system time.  Other C libraries:
    nothing to do.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not trim the heap top below 1 GiB free
        libc.mallopt(-3, 1 << 26)  # M_MMAP_THRESHOLD: arrays below 64 MiB come from the heap
    except (OSError, AttributeError):
        pass


def _render_in_worker(job: tuple[Shot, str]) -> str:
    assert _WORKER is not None, "pool worker used before its initializer ran"
    return _WORKER(job)


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_out_dir(out_dir: Path, cfg: SynthConfig, overwrite: bool) -> str:
    """'complete', 'resume' or 'fresh' for this config, clearing our files first if `overwrite`.

    Raises OutputDirError where the folder holds other data and `overwrite` is not set.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"{out_dir} exists and is not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "fresh"
    wanted = manifest_config(cfg)
    manifest = read_manifest(out_dir)
    if not overwrite:
        if manifest is not None and manifest.get("format_version") == FORMAT_VERSION and manifest.get("config") == wanted:
            return "complete"
        try:
            partial = json.loads((out_dir / PARTIAL_NAME).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            partial = None
        if manifest is None and partial == {"format_version": FORMAT_VERSION, "config": wanted}:
            return "resume"
        if manifest is not None and isinstance(manifest.get("config"), dict):
            old = manifest["config"]
            changed = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
            why = f"it holds synthetic data of another config (differs in: {', '.join(changed) or 'format version'})"
        else:
            why = "it is not empty and holds no complete synthetic dataset of this config"
        raise OutputDirError(
            f"refusing to write into {out_dir}: {why}. Pass --overwrite to replace it (removes only the "
            f"files its {MANIFEST_NAME} lists), or choose another --out."
        )
    _remove_recorded_dataset(out_dir)
    return "fresh"


def _recorded_config(out_dir: Path) -> dict | None:
    """The config of the dataset the manifest (or a partial run's record) in `out_dir` describes."""
    for record in (read_manifest(out_dir), _read_json(out_dir / PARTIAL_NAME)):
        if isinstance(record, dict) and record.get("format_version") == FORMAT_VERSION \
                and isinstance(record.get("config"), dict):
            return record["config"]
    return None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _remove_recorded_dataset(out_dir: Path) -> None:
    """--overwrite: remove exactly the files the recorded dataset consists of, then its empty folders.

    Anything else in `out_dir` (also inside atname/ or gsv_cities/) stays; without a record
    of this generator, nothing is removed and the run refuses.
    """
    recorded = _recorded_config(out_dir)
    if recorded is None:
        taken = [n for n in TOP_NAMES if (out_dir / n).exists() and not (out_dir / n).is_dir()
                 or (out_dir / n).is_dir() and any((out_dir / n).iterdir())]
        if taken:
            raise OutputDirError(
                f"refusing to overwrite {out_dir}: it holds {', '.join(taken)} but no {MANIFEST_NAME} of this "
                "generator says they are synthetic data; nothing was removed. Choose another --out."
            )
        return
    try:
        layout = plan_dataset(from_mapping(SynthConfig, recorded, where=str(out_dir / MANIFEST_NAME)))
    except ValueError as err:  # ConfigError: a record this version cannot re-plan
        raise OutputDirError(f"refusing to overwrite {out_dir}: its recorded config cannot be read ({err}); "
                             "nothing was removed. Choose another --out.") from None
    files = [out_dir / rel for _, rel in layout.jobs] + [out_dir / layout.gsv_csv_relpath]
    folders = {path.parent for path in files}
    for folder in folders:
        files += [p for p in folder.glob(".*") if is_temp_name(p.name)] if folder.is_dir() else []
    for path in files:
        if path.is_file() or path.is_symlink():
            path.unlink()
    for folder in sorted(folders | {f for d in folders for f in d.parents if out_dir in f.parents},
                         key=lambda f: len(f.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for name in (MANIFEST_NAME, PARTIAL_NAME):
        (out_dir / name).unlink(missing_ok=True)


def render_all(jobs: list[tuple[Shot, str]], cfg: SynthConfig, out_dir: Path, progress: bool) -> None:
    """Render and save every job, in `cfg.workers` processes (0 = one per CPU, 1 = in this one)."""
    from tqdm import tqdm

    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), unit="img", desc="rendering", disable=not progress)
    if workers == 1 or len(jobs) < 2:
        renderer = ShotRenderer(cfg, out_dir)
        for job in jobs:
            renderer(job)
            bar.update()
    else:
        chunk = max(1, min(16, len(jobs) // (4 * workers)))
        with multiprocessing.get_context().Pool(workers, _init_worker, (cfg, str(out_dir))) as pool:
            for _ in pool.imap_unordered(_render_in_worker, jobs, chunksize=chunk):
                bar.update()
    bar.close()


def generate(out_dir: Path, cfg: SynthConfig, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the whole synthetic dataset under `out_dir`; returns a summary of what was done.

    Returns:
        {"status": "written" | "resumed" | "unchanged", "out_dir", "counts", "total_images",
         "rendered", "seconds", "workers"}.
    """
    started = time.perf_counter()
    cfg.validate()
    out_dir = Path(out_dir).absolute()
    state = check_out_dir(out_dir, cfg, overwrite)
    if state == "complete":
        manifest = read_manifest(out_dir) or {}
        counts = manifest.get("counts", {})
        return {"status": "unchanged", "out_dir": str(out_dir), "counts": counts, "total_images": counts.get("total_images", 0),
                "rendered": 0, "seconds": time.perf_counter() - started, "workers": 0}  # fmt: skip

    layout = plan_dataset(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / PARTIAL_NAME, json.dumps({"format_version": FORMAT_VERSION, "config": manifest_config(cfg)}).encode())
    for rel in {str(Path(rel).parent) for _, rel in layout.jobs} | {str(Path(layout.gsv_csv_relpath).parent)}:
        (out_dir / rel).mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / layout.gsv_csv_relpath, layout.gsv_csv_text.encode())
    todo = [job for job in layout.jobs if not (out_dir / job[1]).exists()]
    render_all(todo, cfg, out_dir, progress)
    missing = [rel for _, rel in layout.jobs if not (out_dir / rel).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} images were not written, e.g. {missing[0]}")

    manifest = {
        "format_version": FORMAT_VERSION,
        "generator": "synthcity",
        "config": manifest_config(cfg),
        "counts": layout.counts,
        "origins": layout.origins,
        "layout": {
            "atname": "atname/{train,test/database,test/queries,val/database,val/queries}/"
            "@utm_east@utm_north@utm_zone_number@utm_zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height"
            "@timestamp@note@.jpg (val: a third city, 5 km east of the train/test city)",
            "gsv_cities": f"gsv_cities/Dataframes/{cfg.gsv_city}.csv (place_id,year,month,northdeg,city_id,lat,lon,panoid) "
            f"and gsv_cities/Images/{cfg.gsv_city}/<City>_<place_id:07d>_<year>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg",
        },
    }
    write_bytes_atomic(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    (out_dir / PARTIAL_NAME).unlink(missing_ok=True)
    return {
        "status": "resumed" if state == "resume" else "written",
        "out_dir": str(out_dir),
        "counts": layout.counts,
        "total_images": layout.counts["total_images"],
        "rendered": len(todo),
        "seconds": time.perf_counter() - started,
        "workers": cfg.workers or os.cpu_count() or 1,
    }
