"""The label-set contract: versioned view-class labels, one row per image.

Every other module reads and writes label sets through this one.  A labels root holds
versions side by side, each complete or absent:

    labels/v0000/labels.parquet   initial split (heading or random), distance NaN
    labels/v0000/manifest.json
    labels/v0001/...              K-means round 1, matched to v0000
    labels/.v0002.tmp-<pid>/      a write in progress (or a crashed one): never a version

A version is written into a temporary folder, flushed to disk, and renamed to
`vNNNN` in one step, with the manifest written last inside it, so a folder that has
the right name and a valid manifest is a complete version.  Rows are sorted by
`image_id`, so training joins labels to its immutable shards by binary search
(`class_lookup` + `classes_of`), O(log N) per image with no index to build.

The manifest records the sha256 of labels.parquet (`read_labels(..., verify=True)` checks
it) and, in `params`, the shard set the version labels (`shards`, `shards_fingerprint`,
written by clustering.job), so a reader can refuse a version made for other shards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from placeforge.clustering.matching import PreviousLabels
from placeforge.fileio import file_sha256, write_parquet_atomic

LABEL_FORMAT_VERSION = 1
LABELS_FILE = "labels.parquet"
MANIFEST_FILE = "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")

LABEL_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # catalog image id
        pa.field("cell_id", pa.int64(), nullable=False),  # stable_id(cell_key)
        pa.field("cell_key", pa.string(), nullable=False),  # "utm:10N:5510:418000" or a catalog place_key
        pa.field("group_id", pa.int32(), nullable=False),  # CosPlace group: one classifier per group
        pa.field("class_in_cell", pa.int32(), nullable=False),  # stable slot inside the cell
        pa.field("class_id", pa.int64(), nullable=False),  # global class: the classifier row
        pa.field("distance", pa.float32(), nullable=False),  # to the class centroid; NaN in version 0
        pa.field("label_version", pa.int32(), nullable=False),
    ]
)


@dataclass(frozen=True)
class LabelCounts:
    images: int
    cells: int
    classes: int
    images_changed_class: int | None  # since previous_version; None for a first version
    images_new: int  # images absent from the previous version (all of them in a first version)


@dataclass(frozen=True)
class LabelManifest:
    version: int
    created_at: str  # ISO 8601, UTC
    encoder_checkpoint: str | None  # None before any encoder exists (version 0)
    encoder_sha256: str | None
    k: int
    seed: int
    cell_size_m: float
    counts: LabelCounts
    previous_version: int | None
    retired_class_ids: list[int]  # class ids of previous_version that this version no longer uses
    next_class_id: int  # classifier rows needed: every class id ever used is below this
    labels_sha256: str
    method: str = "kmeans"  # "initial" or "kmeans"
    params: dict = field(default_factory=dict)  # e.g. n_init, niter, spherical, cells_apart
    format_version: int = LABEL_FORMAT_VERSION

    @property
    def shards_fingerprint(self) -> str | None:
        """`shards.manifest.Manifest.fingerprint` of the shard set this version labels, or None
        where the writer recorded none (label sets written by hand, a shard set without one)."""
        return self.params.get("shards_fingerprint") or None


def version_dir(root: str | os.PathLike, version: int) -> Path:
    return Path(root) / f"v{version:04d}"


def label_table(image_id: np.ndarray, cell_id: np.ndarray, cell_key: np.ndarray, group_id: np.ndarray,
                class_in_cell: np.ndarray, class_id: np.ndarray, distance: np.ndarray | None,
                label_version: int) -> pa.Table:
    """A label table from [N] column arrays, sorted by image_id.

    `distance=None` (version 0, no centroids yet) stores NaN.
    Raises:
        ValueError: duplicate image ids, or columns of different lengths.
    """
    image_id = np.asarray(image_id, dtype=np.int64)
    n = len(image_id)
    distance = np.full(n, np.nan, np.float32) if distance is None else np.asarray(distance, np.float32)
    columns = [image_id, np.asarray(cell_id, np.int64), np.asarray(cell_key, dtype=object),
               np.asarray(group_id, np.int32), np.asarray(class_in_cell, np.int32),
               np.asarray(class_id, np.int64), distance, np.full(n, label_version, np.int32)]
    if any(len(c) != n for c in columns):
        raise ValueError(f"label columns have different lengths: {[len(c) for c in columns]}")
    order = np.argsort(image_id, kind="stable")
    if n > 1 and np.any(image_id[order][1:] == image_id[order][:-1]):
        raise ValueError("label set has duplicate image_id values")
    arrays = [pa.array(c[order], type=f.type, from_pandas=False) for c, f in zip(columns, LABEL_SCHEMA)]
    return pa.Table.from_arrays(arrays, schema=LABEL_SCHEMA)


def write_label_set(
    root: str | os.PathLike,
    table: pa.Table,
    *,
    k: int,
    seed: int,
    cell_size_m: float,
    previous_version: int | None,
    retired_class_ids: np.ndarray | list[int],
    next_class_id: int,
    images_changed_class: int | None,
    images_new: int,
    encoder_checkpoint: str | os.PathLike | None = None,
    encoder_sha256: str | None = None,
    method: str = "kmeans",
    params: dict | None = None,
    extras: Callable[[Path], None] | None = None,
) -> LabelManifest:
    """Write `table` as a new complete version under `root`, atomically.

    The version number is the table's `label_version`; an existing `vNNNN` is never
    overwritten.  `encoder_sha256` is computed from `encoder_checkpoint` when that is a
    file and no hash is given (a checkpoint folder is recorded by path only).
    `extras(folder)` is called with the version's temporary folder before the manifest
    is written: files it writes there (e.g. `plots/`) appear with the version, in the
    same rename, and if it raises no version is written.
    Returns the manifest written.
    """
    table = table.select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)
    versions = np.unique(table.column("label_version").to_numpy())
    if len(versions) != 1:
        raise ValueError(f"a label set holds exactly one label_version, got {versions.tolist()}")
    version = int(versions[0])
    root = Path(root)
    final = version_dir(root, version)
    if final.exists():
        raise FileExistsError(f"{final} already exists; label versions are never overwritten")
    if encoder_checkpoint is not None and encoder_sha256 is None and Path(encoder_checkpoint).is_file():
        encoder_sha256 = file_sha256(encoder_checkpoint)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only this process writes this name
    tmp.mkdir()
    try:
        write_parquet_atomic(table, tmp / LABELS_FILE)
        _fsync(tmp / LABELS_FILE)
        if extras is not None:
            extras(tmp)
        manifest = LabelManifest(
            version=version,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            encoder_checkpoint=None if encoder_checkpoint is None else str(encoder_checkpoint),
            encoder_sha256=encoder_sha256,
            k=int(k),
            seed=int(seed),
            cell_size_m=float(cell_size_m),
            counts=LabelCounts(
                images=table.num_rows,
                cells=len(np.unique(table.column("cell_id").to_numpy())),
                classes=len(np.unique(table.column("class_id").to_numpy())),
                images_changed_class=images_changed_class,
                images_new=int(images_new),
            ),
            previous_version=previous_version,
            retired_class_ids=[int(x) for x in np.asarray(retired_class_ids).tolist()],
            next_class_id=int(next_class_id),
            labels_sha256=file_sha256(tmp / LABELS_FILE),
            method=method,
            params=dict(params or {}),
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
        _fsync(tmp / MANIFEST_FILE)
        _fsync(tmp)
        os.rename(tmp, final)  # the one step that makes the version exist
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_manifest(folder: Path) -> LabelManifest:
    """Parse folder/manifest.json; ValueError naming the file if it is not a valid manifest."""
    path = folder / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != LABEL_FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')}, this code reads {LABEL_FORMAT_VERSION}")
        data["counts"] = LabelCounts(**data["counts"])
        manifest = LabelManifest(**data)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid label-set manifest ({error})") from error
    match = _VERSION_DIR.match(folder.name)
    if match is None or int(match.group(1)) != manifest.version:
        raise ValueError(f"{path}: manifest says version {manifest.version}, folder is {folder.name}")
    return manifest


def list_versions(root: str | os.PathLike) -> list[int]:
    """Complete versions under `root`, ascending: folder named vNNNN with a valid manifest."""
    root = Path(root)
    if not root.is_dir():
        return []
    versions = []
    for entry in root.iterdir():
        if not (entry.is_dir() and _VERSION_DIR.match(entry.name)):
            continue  # temporary folders (".v0002.tmp-123") and stray files
        try:
            versions.append(_load_manifest(entry).version)
        except (OSError, ValueError):
            continue  # incomplete or damaged: not a version
    return sorted(versions)


def latest_version(root: str | os.PathLike) -> int | None:
    """The highest complete version under `root`, or None if there is none."""
    versions = list_versions(root)
    return versions[-1] if versions else None


def next_version(root: str | os.PathLike) -> int:
    """1 + the highest vNNNN folder of any state, so a damaged folder never blocks a write."""
    root = Path(root)
    numbers = [int(m.group(1)) for e in root.iterdir() if (m := _VERSION_DIR.match(e.name))] if root.is_dir() else []
    return max(numbers) + 1 if numbers else 0


def _resolve(root: str | os.PathLike, version: int | None) -> Path:
    if version is None:
        version = latest_version(root)
        if version is None:
            raise FileNotFoundError(f"{root}: no complete label version (vNNNN/ with {MANIFEST_FILE})")
    folder = version_dir(root, version)
    if not (folder / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{folder / MANIFEST_FILE} not found: label version {version} is not complete")
    return folder


def read_manifest(root: str | os.PathLike, version: int | None = None) -> LabelManifest:
    """The manifest of `version`, or of the latest complete version when None."""
    return _load_manifest(_resolve(root, version))


def read_labels(root: str | os.PathLike, version: int | None = None, verify: bool = False) -> pa.Table:
    """The label table of `version` (latest complete when None), sorted by image_id.

    Args:
        verify: also check the file's sha256 against the manifest (reads the file twice).
    Raises:
        ValueError: a damaged or foreign labels.parquet, naming the file.
    """
    folder = _resolve(root, version)
    manifest = _load_manifest(folder)
    path = folder / LABELS_FILE
    if verify and file_sha256(path) != manifest.labels_sha256:
        raise ValueError(f"{path}: sha256 differs from {folder / MANIFEST_FILE}; the file is damaged")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"{path}: cannot read label set version {manifest.version} ({error})") from error
    missing = set(LABEL_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a label set (missing columns {sorted(missing)})")
    if table.num_rows != manifest.counts.images:
        raise ValueError(f"{path}: {table.num_rows} rows, manifest says {manifest.counts.images}")
    return table.select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)


def previous_labels(root: str | os.PathLike, version: int | None = None) -> tuple[PreviousLabels, LabelManifest]:
    """A version as matching input: its arrays and its manifest (latest when None)."""
    manifest = read_manifest(root, version)
    table = read_labels(root, manifest.version)
    previous = PreviousLabels(
        image_id=table.column("image_id").to_numpy(),
        cell_id=table.column("cell_id").to_numpy(),
        class_in_cell=table.column("class_in_cell").to_numpy(),
        class_id=table.column("class_id").to_numpy(),
        next_class_id=manifest.next_class_id,
    )
    return previous, manifest


def class_lookup(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids ascending [N] int64, class_ids [N] int64) for joins by binary search."""
    image_ids = table.column("image_id").to_numpy()
    class_ids = table.column("class_id").to_numpy()
    if len(image_ids) > 1 and not np.all(image_ids[1:] > image_ids[:-1]):
        order = np.argsort(image_ids, kind="stable")
        image_ids, class_ids = image_ids[order], class_ids[order]
    return image_ids, class_ids


def classes_of(image_ids: np.ndarray, class_ids: np.ndarray, query_image_ids: np.ndarray) -> np.ndarray:
    """Class id of each queried image (-1 if unlabelled), by np.searchsorted.

    Args:
        image_ids, class_ids: [N] from `class_lookup`.
        query_image_ids: [Q] int64.
    Returns:
        [Q] int64.
    """
    query = np.asarray(query_image_ids, dtype=np.int64)
    if len(image_ids) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(image_ids, query), len(image_ids) - 1)
    return np.where(image_ids[pos] == query, class_ids[pos], -1).astype(np.int64)
