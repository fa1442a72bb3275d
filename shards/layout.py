"""The shard contract: folder layout, naming, and the layout of one place sample.

A shard set is a folder:

    DIR/
      shards/shard-000000.tar ...   WebDataset tars; one sample = one place (or one part of a big place)
      catalog.parquet               every image that is in the shards (placeforge.catalog schema)
      rejects.parquet               every input that is not, with a reason
      index.parquet                 image -> shard, sample, member (shards.index schema)
      manifest.json                 config, counts, per-shard size and sha256; written last

One sample in a tar is the members

    s000000042.json      the sample record (below)
    s000000042.000.jpg   image 0 of the sample
    s000000042.001.jpg   image 1 ...

so plain `webdataset.WebDataset(url)` yields {"__key__": "s000000042", "json": ..., "000.jpg": ...}.
Keys are generated here and never taken from dataset file names (which are untrusted).

The sample record (JSON):
    {"format": 1, "sample_key": str, "place_id": int, "place_key": str, "part": int, "parts": int,
     "images": [{"member": "000.jpg", "image_id": int, "width": int, "height": int,
                 "lat": float|null, "lon": float|null, "utm_east": float|null, "utm_north": float|null,
                 "utm_zone": int|null, "heading_deg": float|null}, ...]}
"""

from __future__ import annotations

import re

FORMAT_VERSION = 1
SHARD_SUBDIR = "shards"
CATALOG_FILE = "catalog.parquet"
REJECTS_FILE = "rejects.parquet"
INDEX_FILE = "index.parquet"
MANIFEST_FILE = "manifest.json"
WORK_SUBDIR = "_work"  # plan and per-shard results while a build is in progress

IMAGE_META_FIELDS = ("lat", "lon", "utm_east", "utm_north", "utm_zone", "heading_deg")

_MEMBER_RE = re.compile(r"^(\d{3,})\.jpg$")


def shard_name(shard_index: int) -> str:
    """File name of shard `shard_index` (zero-padded so names sort in index order)."""
    if shard_index < 0:
        raise ValueError(f"shard index must be >= 0, got {shard_index}")
    return f"shard-{shard_index:06d}.tar"


def sample_key(sample_index: int) -> str:
    """WebDataset key of sample `sample_index`; contains no dot, as webdataset requires."""
    return f"s{sample_index:09d}"


def image_member(position: int) -> str:
    """Member suffix of the `position`-th image in a sample ("000.jpg")."""
    return f"{position:03d}.jpg"


def image_members(sample: dict) -> list[str]:
    """The image member suffixes present in a decoded webdataset sample, in order."""
    return sorted(k for k in sample if _MEMBER_RE.match(k))
