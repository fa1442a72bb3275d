"""Tiny shard sets written directly with the shard writer (no Ray), for loader and trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa

from placeforge.shards.index import index_table, write_index
from placeforge.shards.layout import INDEX_FILE, SHARD_SUBDIR, sample_key
from placeforge.shards.manifest import Manifest, write_manifest
from placeforge.shards.writer import write_shard

# image(place, sample_index, position in sample) -> (image_id, encoded image)
ImageMaker = Callable[[int, int, int], tuple[int, bytes]]


def write_shard_set(root: Path, layout: list[list[tuple[int, int]]], image: ImageMaker, short_side: int) -> list[int]:
    """A complete shard set: layout[shard] = [(place, images), ...], one sample per entry.

    Returns every image id written, in layout order.
    """
    (root / SHARD_SUBDIR).mkdir(parents=True)
    (root / "src").mkdir()
    records, index_rows, ids, sample_index = [], [], [], 0
    for shard, entries in enumerate(layout):
        rows = []
        for place, n in entries:
            parts = sum(1 for s in layout for p, _ in s if p == place)
            for i in range(n):
                image_id, data = image(place, sample_index, i)
                path = root / "src" / f"{image_id}.jpg"
                path.write_bytes(data)
                rows.append({
                    "path": str(path), "relpath": path.name, "source": "test", "dataset": "test",
                    "image_id": image_id, "place_id": place, "place_key": f"p{place}",
                    "sample_key": sample_key(sample_index), "part": 0, "parts": parts,
                    # places 100 m apart along one line, their images 1 m apart
                    "lat": None, "lon": None, "utm_east": 100.0 * place + i, "utm_north": 0.0, "utm_zone": 10,
                    "heading_deg": None,
                })  # fmt: skip
                ids.append(image_id)
            sample_index += 1
        result = write_shard(root / SHARD_SUBDIR, shard, pa.Table.from_pylist(rows), short_side, 90)
        records.append(result.record)
        index_rows += result.index_rows
    write_index(index_table(index_rows), root / INDEX_FILE)
    write_manifest(Manifest(config={}, sources=[], counts={}, shards=records), root)
    return ids
