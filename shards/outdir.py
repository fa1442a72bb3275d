"""The output folder of a shard build: what placeforge owns in it, and claiming it.

    if claim_out_dir(out, fingerprint, overwrite):   # True: `out` already holds exactly this set
        ...

A build removes only files a build recorded as its own (the shard set's manifest.json, or an
interrupted build's _work/fingerprint and plan), and only with `overwrite`; an entry named like
a build output that no record covers is someone else's, and the build refuses (OutDirError,
which shards.build reports as a BuildError).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from placeforge.fileio import LOCK_FILE, is_temp_name
from placeforge.shards.layout import (
    CATALOG_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    REJECTS_FILE,
    SHARD_SUBDIR,
    WORK_SUBDIR,
    shard_name,
)
from placeforge.shards.manifest import PLAN_RECORD_FILE, PlanRecord, read_manifest, read_plan_record

log = logging.getLogger(__name__)


class OutDirError(ValueError):
    """`--out` holds something a build must not use or remove; the message says what to do."""


OWN_NAMES = (CATALOG_FILE, REJECTS_FILE, INDEX_FILE, MANIFEST_FILE, PLAN_RECORD_FILE, SHARD_SUBDIR, WORK_SUBDIR)
FINGERPRINT_FILE = "fingerprint"  # in _work/: the record that an interrupted build there is placeforge's
PLAN_FILE = "plan.parquet"


def claim_out_dir(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """Prepare `out` for this build; True if it already holds exactly this shard set.

    Only files a build recorded as its own (the shard set's manifest.json, or an interrupted
    build's _work/fingerprint and plan) are ever removed, and only with `overwrite`; an entry
    named like a build output that no record covers is someone else's, and the build refuses.
    """
    work = out / WORK_SUBDIR
    if (out / MANIFEST_FILE).is_file() and not overwrite:
        if read_own_manifest(out).fingerprint == fingerprint:
            return True
        raise OutDirError(f"{out} holds a shard set built with another config or inputs; use --overwrite to replace it")
    if (work / FINGERPRINT_FILE).is_file() and not overwrite:
        planned = (out / PLAN_RECORD_FILE).is_file()
        if (work / FINGERPRINT_FILE).read_text().strip() != fingerprint:
            held = "a plan (--plan-only)" if planned else "an interrupted build"
            raise OutDirError(
                f"{out} holds {held} with another config or inputs; "
                "re-run with its arguments to resume, or --overwrite to start again"
            )
        log.info("continuing the plan in %s" if planned else "resuming the interrupted build in %s", out)
        # Half-written files of the killed run (the lock says no other build is running); their shards are rebuilt.
        remove_owned([*temp_files(out / SHARD_SUBDIR), *temp_files(work)])
        return False
    owned = owned_files(out)
    if owned is None:
        taken = [name for name in OWN_NAMES if (out / name).exists() and not is_empty_dir(out / name)]
        if taken:
            raise OutDirError(
                f"--out {out} holds {', '.join(taken)} that no placeforge build recorded (no manifest.json, no "
                f"{WORK_SUBDIR}/{FINGERPRINT_FILE}); nothing was removed: choose another --out, or move them away"
            )
        foreign = [p.name for p in out.iterdir() if p.name not in (*OWN_NAMES, LOCK_FILE)] if out.is_dir() else []
        if foreign and not overwrite:
            raise OutDirError(f"--out {out} is not empty and is not a shard set ({foreign[:3]}...); choose an empty folder")
    else:
        remove_owned(owned)  # --overwrite: exactly the files the old build recorded
        for folder in (work, out / SHARD_SUBDIR):
            remove_empty_dir(folder)
    (out / SHARD_SUBDIR).mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return False


def read_own_manifest(out: Path):
    try:
        return read_manifest(out)
    except (ValueError, KeyError, TypeError) as err:
        raise OutDirError(f"{out / MANIFEST_FILE} is not a placeforge shard-set manifest ({err}); nothing was "
                         "removed: choose another --out") from None


def read_own_plan(out: Path) -> PlanRecord:
    try:
        return read_plan_record(out)
    except (ValueError, KeyError, TypeError) as err:
        raise OutDirError(f"{out / PLAN_RECORD_FILE} is not a placeforge shard-set plan ({err}); nothing was "
                         "removed: choose another --out") from None


def owned_files(out: Path) -> list[Path] | None:
    """Every file the build recorded in `out` wrote (existing or not), or None when no record is there."""
    work = out / WORK_SUBDIR
    if (out / MANIFEST_FILE).is_file():
        manifest = read_own_manifest(out)
        shards = [out / SHARD_SUBDIR / Path(record.name).name for record in manifest.shards]
        files = [out / CATALOG_FILE, out / REJECTS_FILE, out / INDEX_FILE, *shards, out / MANIFEST_FILE,
                 out / PLAN_RECORD_FILE]  # plan.json: left by a build killed just after its manifest
    elif (work / FINGERPRINT_FILE).is_file() and (work / PLAN_FILE).is_file():
        indices = pc.unique(pq.read_table(work / PLAN_FILE, columns=["shard_index"]).column("shard_index")).to_pylist()
        files = [*(out / SHARD_SUBDIR / shard_name(i) for i in indices), *work_files(work, indices)]
        if (out / PLAN_RECORD_FILE).is_file():
            read_own_plan(out)  # a plan.json of ours: then the catalog and rejects beside it are ours too
            files += [out / CATALOG_FILE, out / REJECTS_FILE, out / PLAN_RECORD_FILE]
    else:
        return None
    return [*files, *temp_files(out), *temp_files(out / SHARD_SUBDIR), *temp_files(work)]


def work_files(work: Path, shard_indices) -> list[Path]:
    """The files a build keeps in _work/: its plan and fingerprint, and three per finished shard."""
    per_shard = [work / f"{shard_name(i)}.{suffix}" for i in shard_indices
                 for suffix in ("record.json", "index.parquet", "rejects.parquet")]
    return [*per_shard, work / PLAN_FILE, work / FINGERPRINT_FILE]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.glob(".*") if is_temp_name(p.name) and p.is_file()] if folder.is_dir() else []


def remove_owned(files: list[Path]) -> None:
    for path in files:
        if path.is_file() or path.is_symlink():
            path.unlink()


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def remove_empty_dir(path: Path) -> None:
    if is_empty_dir(path):
        path.rmdir()


def shard_done(out: Path, shard_index: int) -> bool:
    record = out / WORK_SUBDIR / f"{shard_name(shard_index)}.record.json"
    tar = out / SHARD_SUBDIR / shard_name(shard_index)
    if not (record.is_file() and tar.is_file()):
        return False
    return json.loads(record.read_text())["bytes"] == tar.stat().st_size
