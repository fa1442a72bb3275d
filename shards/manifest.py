"""The shard-set manifest: what was built, from what, with which config; written last.

Its presence marks a complete shard set.  Per shard it records the image and sample
counts, the byte size and the sha256, so a reader or a copy job can verify shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from placeforge.fileio import write_json_atomic
from shards.layout import FORMAT_VERSION, MANIFEST_FILE


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


def read_manifest(out_dir: str | os.PathLike) -> Manifest:
    """Read DIR/manifest.json; a missing file means the shard set is incomplete."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {out_dir} is not a complete shard set (run pipelines/build_shards.py)"
        )
    data = json.loads(path.read_text())
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: shard format version {version}, this code reads {FORMAT_VERSION}")
    data["shards"] = [ShardRecord(**s) for s in data["shards"]]
    return Manifest(**data)
