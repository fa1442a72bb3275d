"""The shard-set manifest: what was built, from what, with which config; written last.

Its presence marks a complete shard set.  Per shard it records the image and sample
counts, the byte size and the sha256, so a reader or a copy job can verify shards.

A plan-only build (`build_shards.py --plan-only`) writes a `PlanRecord` (plan.json) instead:
what the build would make, with no shard written.  A folder with plan.json and no
manifest.json is a plan, never a shard set; the build that follows it removes plan.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from placeforge.fileio import write_json_atomic
from placeforge.shards.layout import FORMAT_VERSION, MANIFEST_FILE


@dataclass(frozen=True)
class ShardRecord:
    name: str  # "shard-000000.tar", relative to DIR/shards
    images: int
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    config: dict
    sources: list[str]
    counts: dict  # inputs, in_shards, rejected, rejected_by_reason, places, samples, shards
    shards: list[ShardRecord]
    fingerprint: str = ""  # hash of config + sources + plan; equal fingerprints mean equal shard sets
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(s.images for s in self.shards)


def write_manifest(manifest: Manifest, out_dir: str | os.PathLike) -> Path:
    return write_json_atomic(Path(out_dir) / MANIFEST_FILE, asdict(manifest), sort_keys=True)


PLAN_RECORD_FILE = "plan.json"  # beside manifest.json; see PlanRecord


@dataclass(frozen=True)
class PlanRecord:
    """What a plan-only build found and planned; no image was opened and no shard written."""

    config: dict
    sources: list[str]
    counts: dict  # inputs, planned, rejected, rejected_by_reason, places, samples, shards
    fingerprint: str  # the fingerprint the shard set built from this plan will carry
    plan_only: bool = True
    format_version: int = FORMAT_VERSION
    created_at: str = ""


def write_plan_record(record: PlanRecord, out_dir: str | os.PathLike) -> Path:
    return write_json_atomic(Path(out_dir) / PLAN_RECORD_FILE, asdict(record), sort_keys=True)


def read_plan_record(out_dir: str | os.PathLike) -> PlanRecord:
    """Read DIR/plan.json; ValueError (naming the file) for one this code did not write."""
    path = Path(out_dir) / PLAN_RECORD_FILE
    data = _read_json_object(path, "a shard-set plan")
    if data.get("format_version") != FORMAT_VERSION or data.get("plan_only") is not True:
        raise ValueError(f"{path} is not a plan of shard format version {FORMAT_VERSION}")
    _check_keys(path, "", data, PlanRecord)
    return PlanRecord(**data)


REBUILD = "rebuild the shard set with pipelines/build_shards.py"


def read_manifest(out_dir: str | os.PathLike) -> Manifest:
    """Read DIR/manifest.json; a missing file means the shard set is incomplete.

    Raises:
        FileNotFoundError: no manifest.json.
        ValueError: one that is not JSON, lacks or adds keys, or has another format version
            (a manifest of another tool, a damaged copy); the message names the file.
    """
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {out_dir} is not a complete shard set (run pipelines/build_shards.py)"
        )
    data = _read_json_object(path, "a shard-set manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: shard format version {version}, this code reads {FORMAT_VERSION}")
    _check_keys(path, "", data, Manifest)
    if not isinstance(data["shards"], list) or not all(isinstance(s, dict) for s in data["shards"]):
        raise ValueError(f"{path}: 'shards' is not a list of shard records; {REBUILD}")
    for position, record in enumerate(data["shards"]):
        _check_keys(path, f"shards[{position}] ", record, ShardRecord)
    data["shards"] = [ShardRecord(**s) for s in data["shards"]]
    return Manifest(**data)


def _read_json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; {REBUILD}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON (line {err.lineno}, column {err.colno}: {err.msg}); {REBUILD}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not {what}; {REBUILD}")
    return data


def _check_keys(path: Path, where: str, data: dict, cls: type) -> None:
    """A manifest written by another tool, by hand or damaged fails here, naming what differs."""
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing, unknown = sorted(required - set(data)), sorted(set(data) - known)
    if missing or unknown:
        problems = ([f"lacks keys {', '.join(missing)}"] if missing else []) + \
                   ([f"has unknown keys {', '.join(unknown)}"] if unknown else [])
        raise ValueError(f"{path}: {where}{' and '.join(problems)}: not a shard-set manifest of this version; "
                         f"{REBUILD}")
