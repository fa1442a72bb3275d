"""Write one shard: read, re-encode and pack the images its plan rows name.

This is the unit of parallel work in `pipelines/build_shards.py`: one call per shard,
independent of every other shard, safe to retry.  The tar is written under a
temporary name in the same folder and renamed into place, so a killed worker never
leaves a half-written shard under its final name, and a retry rewrites the same bytes
(member mtimes are fixed).

The tar is written with the standard library's `tarfile`, by webdataset's TarWriter rules
(`_write_sample`), not with webdataset itself: `import webdataset` imports torch (its package
`__init__` loads `webdataset.pytorch`), seconds of start-up in every worker process of a job
that never uses it.  The bytes are those `webdataset.TarWriter(stream, encoder=False,
mtime=0)` writes (tests/test_writer.py compares them).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from placeforge.fileio import file_sha256
from placeforge.imaging import DecodeError, reencode_jpeg
from placeforge.ingest.listing import check_files, read_image_file
from placeforge.shards.layout import FORMAT_VERSION, IMAGE_META_FIELDS, image_member, shard_name
from placeforge.shards.manifest import ShardRecord

FIXED_MTIME = 0.0  # reproducible tars: identical inputs give byte-identical shards
TAR_OWNER = "bigdata"  # webdataset.TarWriter's default user and group names
TAR_MODE = 0o444  # and its default member mode


@dataclass(frozen=True)
class ShardResult:
    record: ShardRecord
    index_rows: list[dict]  # shards.index.INDEX_SCHEMA rows
    reject_rows: list[dict]  # placeforge.catalog.REJECTS_SCHEMA rows (stage "encode")


def _clean(value: object) -> object:
    """JSON-safe metadata: NaN/None become null."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


def _reject(row: dict, reason: str, detail: str) -> dict:
    return {
        "input": row["relpath"],
        "source": row["source"],
        "dataset": row["dataset"],
        "stage": "encode",
        "reason": reason,
        "detail": detail,
        "image_id": row["image_id"],
    }


def _why_unread(path: Path) -> tuple[str, str]:
    """(reason, detail) for a source image `read_image_file` refused: it is checked again as
    ingest checks files (it may have changed since ingest listed it)."""
    problem = check_files(path.parent, [path.name], "unreadable").problem[0]
    return problem or ("unreadable", f"{path.name} changed while it was read")


def write_shard(
    shard_dir: str | os.PathLike, shard_index: int, plan: pa.Table, short_side: int, jpeg_quality: int
) -> ShardResult:
    """Build shard `shard_index` from its plan rows (sorted by sample, then member).

    Source images are opened only as regular files of at most MAX_IMAGE_BYTES
    (placeforge.ingest.listing.read_image_file), so a FIFO or a device swapped in since ingest
    cannot block or flood the task.  Images that cannot be read or decoded, and byte-identical
    copies of an image already in the same sample, become reject rows; the remaining images
    of a sample are renumbered so members stay contiguous (000, 001, ...).
    """
    shard_dir = Path(shard_dir)
    final = shard_dir / shard_name(shard_index)
    tmp = shard_dir / f".{final.name}.tmp-{os.getpid()}"
    index_rows: list[dict] = []
    reject_rows: list[dict] = []
    samples = 0
    rows = plan.to_pylist()
    try:
        with open(tmp, "wb") as stream:
            tar = tarfile.open(fileobj=stream, mode="w|")  # a stream tar, as webdataset.TarWriter opens it
            try:
                start = 0
                while start < len(rows):
                    end = start
                    while end < len(rows) and rows[end]["sample_key"] == rows[start]["sample_key"]:
                        end += 1
                    sample = _encode_sample(rows[start:end], short_side, jpeg_quality, index_rows, reject_rows,
                                            shard_index)
                    if sample is not None:
                        _write_sample(tar, sample)
                        samples += 1
                    start = end
            except BaseException:
                # Let tarfile finish its stream now (into the file about to be deleted), not from a
                # finaliser after `stream` is closed; a second error (the disk is still full) is moot.
                with contextlib.suppress(Exception):
                    tar.close()
                raise
            tar.close()
        os.replace(tmp, final)
    except BaseException:
        # A full disk or a kill leaves no partial file behind, under any name.
        tmp.unlink(missing_ok=True)
        raise
    record = ShardRecord(
        name=final.name,
        images=len(index_rows),
        samples=samples,
        bytes=final.stat().st_size,
        sha256=file_sha256(final),
    )
    return ShardResult(record, index_rows, reject_rows)


def _write_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """Append one sample as webdataset.TarWriter.write does with encoder=False: member "KEY.EXT"
    per field in sorted field order, owner bigdata:bigdata, mode 0444, mtime FIXED_MTIME."""
    key = sample["__key__"]
    for field_name in sorted(sample):
        if field_name == "__key__":
            continue
        data = sample[field_name]
        info = tarfile.TarInfo(f"{key}.{field_name}")
        info.size = len(data)
        info.mtime = FIXED_MTIME
        info.mode = TAR_MODE
        info.uname = info.gname = TAR_OWNER
        tar.addfile(info, io.BytesIO(data))


def _encode_sample(
    rows: list[dict],
    short_side: int,
    jpeg_quality: int,
    index_rows: list[dict],
    reject_rows: list[dict],
    shard_index: int,
) -> dict | None:
    """One webdataset sample dict for the rows of one sample, or None if no image survived."""
    first = rows[0]
    sample: dict = {"__key__": first["sample_key"]}
    images: list[dict] = []
    seen_digests: set[str] = set()
    for row in rows:
        raw = read_image_file(row["path"])
        if raw is None:
            reject_rows.append(_reject(row, *_why_unread(Path(row["path"]))))
            continue
        digest = hashlib.sha1(raw).hexdigest()
        if digest in seen_digests:
            reject_rows.append(_reject(row, "duplicate", f"same bytes as another image of place {first['place_key']}"))
            continue
        try:
            encoded = reencode_jpeg(raw, short_side, jpeg_quality)
        except DecodeError as err:
            reject_rows.append(_reject(row, "decode_error", str(err)))
            continue
        seen_digests.add(digest)
        member = image_member(len(images))
        sample[member] = encoded.jpeg
        images.append(
            {"member": member, "image_id": row["image_id"], "width": encoded.width, "height": encoded.height}
            | {k: _clean(row[k]) for k in IMAGE_META_FIELDS}
        )
        index_rows.append(
            {
                "image_id": row["image_id"],
                "place_id": row["place_id"],
                "shard_index": shard_index,
                "sample_key": first["sample_key"],
                "member": member,
                "width": encoded.width,
                "height": encoded.height,
                "jpeg_bytes": len(encoded.jpeg),
                "source_sha1": digest,
            }
        )
    if not images:
        return None
    record = {
        "format": FORMAT_VERSION,
        "sample_key": first["sample_key"],
        "place_id": first["place_id"],
        "place_key": first["place_key"],
        "part": first["part"],
        "parts": first["parts"],
        "images": images,
    }
    sample["json"] = json.dumps(record, sort_keys=True).encode("utf-8")
    return sample
