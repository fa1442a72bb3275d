"""Orchestration of one clustering round: catalog + shards (+ checkpoint) -> a new label version.

`pipelines/recluster.py` is the command-line shell around `recluster`.

  * No checkpoint: version 0 (or, with `force`, a fresh initial split as the next version)
    from the catalog alone: cells, then `initial_classes` by `ReclusterConfig.initial` (by
    heading, else random; or random everywhere, as MutualVPR's official code).
  * With a checkpoint: a Ray Data job streams every shard, embeds every image with the
    checkpoint (one model per actor), joins images to cells, and runs per-cell K-means in
    P partitions of cells (clustering/stages.py).  The driver collects only
    (image_id, cell_id, class, distance) rows, checks that every image of the shard set got
    exactly one, matches the classes to the previous version and writes the new version.

A run that fails for any reason writes no version: label sets are only created by
`write_label_set`, in one rename, after every check has passed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from placeforge.catalog import read_catalog
from placeforge.clustering.cells import DEFAULT_CELLS_APART, cells_from_catalog
from placeforge.clustering.descriptors import descriptor_dir, publish, reusable, temporary_dir
from placeforge.clustering.initial import INITIAL_SPLITS, initial_classes
from placeforge.clustering.labels import (
    LabelManifest,
    label_table,
    latest_version,
    next_version,
    previous_labels,
    read_labels,
    version_dir,
    write_label_set,
)
from placeforge.clustering.matching import PreviousLabels, relabel
from placeforge.clustering.plots import pick_plot_cells, write_cell_plot
from placeforge.clustering.stages import UNKNOWN_CELL, CellLookup, images_of_shard
from placeforge.config import to_dict
from placeforge.fileio import OutputLockedError, file_sha256, output_lock
from placeforge.raysession import quiet_data_context, ray_session
from placeforge.shards.index import read_index
from placeforge.shards.layout import CATALOG_FILE, INDEX_FILE, SHARD_SUBDIR, shard_name
from placeforge.shards.reader import ShardSet

log = logging.getLogger(__name__)


class ReclusterError(RuntimeError):
    """The round cannot run or its result is unusable; the message says what is wrong."""


@dataclass(frozen=True)
class ReclusterConfig:
    k: int = field(default=3, metadata={
        "help": "view classes per cell (MutualVPR's official default: 6, --C in myparser.py)"})
    seed: int = field(default=0, metadata={"help": "seed of the initial split, K-means and the plotted cells"})
    initial: str = field(default="heading", metadata={
        "help": "initial split without a checkpoint: heading (K-means on the compass heading where every image of "
                "a cell has one, else random) or random (every cell, headings ignored: MutualVPR's official code)"})
    cell_size_m: float = field(default=10.0, metadata={"help": "side of a UTM cell in metres (MutualVPR: 10)"})
    cells_apart: int = field(default=DEFAULT_CELLS_APART, metadata={"help": "CosPlace groups: cells N apart share one"})
    n_init: int = field(default=10, metadata={"help": "K-means restarts per cell, best kept"})
    niter: int = field(default=20, metadata={"help": "Lloyd iterations per restart"})
    spherical: bool = field(default=False, metadata={"help": "cosine K-means (unit centroids)"})
    batch_size: int = field(default=64, metadata={"help": "images per encoder batch"})
    embed_actors: int = field(default=0, metadata={"help": "encoder actors (0: one per GPU, else one per 2 CPUs)"})
    partitions: int = field(default=0, metadata={"help": "cell partitions for K-means (0: the cluster's CPUs)"})
    plots_cells: int = field(default=8, metadata={"help": "cells to plot into the version's plots/ (0: none)"})

    def validate(self) -> None:
        for name in ("k", "n_init", "niter", "batch_size", "cells_apart"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("embed_actors", "partitions", "plots_cells"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.cell_size_m > 0:
            raise ValueError(f"cell_size_m must be > 0, got {self.cell_size_m}")
        if self.initial not in INITIAL_SPLITS:
            raise ValueError(f"initial must be one of {', '.join(INITIAL_SPLITS)}, got {self.initial!r}")


@dataclass(frozen=True)
class ImageCells:
    """Every image of the shard set with its cell, sorted by image_id (from the catalog)."""

    image_id: np.ndarray  # [N] int64, ascending
    cell_id: np.ndarray  # [N] int64
    cell_key: np.ndarray  # [N] object (str)
    group_id: np.ndarray  # [N] int32
    heading_deg: np.ndarray  # [N] float64, NaN where unknown
    shard_index: np.ndarray  # [N] int32, from index.parquet
    member: np.ndarray  # [N] object, "<sample_key>.<NNN>.jpg" inside the shard tar


@dataclass(frozen=True)
class ReclusterSummary:
    labels_dir: Path
    manifest: LabelManifest
    plots: list[Path]
    descriptors_dir: Path | None
    seconds: float

    def report(self) -> str:
        m, c = self.manifest, self.manifest.counts
        lines = [
            f"label version v{m.version:04d} ({m.method}) in {version_dir(self.labels_dir, m.version)}",
            f"images {c.images}, cells {c.cells}, classes {c.classes} (classifier rows {m.next_class_id}, "
            f"retired {len(m.retired_class_ids)})",
            f"changed class since v{m.previous_version:04d}: {c.images_changed_class} images, new images {c.images_new}"
            if m.previous_version is not None else "first version: no previous classes to match",
        ]
        if m.encoder_checkpoint:
            lines.append(f"encoder {m.encoder_checkpoint} (sha256 {m.encoder_sha256})")
        if self.plots:
            lines.append(f"plots of {len(self.plots)} cells in {self.plots[0].parent}")
        if self.descriptors_dir is not None:
            lines.append(f"descriptors kept in {self.descriptors_dir}")
        lines.append(f"done in {self.seconds:.1f} s")
        return "\n".join(lines)


def recluster(
    shards_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    cfg: ReclusterConfig,
    checkpoint: str | os.PathLike | None = None,
    keep_descriptors: bool = False,
    force: bool = False,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    actor_resources: dict[str, float] | None = None,
) -> ReclusterSummary:
    """Write the next label version of `labels_dir` for the shard set in `shards_dir`.

    `actor_resources`: custom Ray resources each encoder actor asks for (e.g. placeforge_gpu_node).
    """
    started = time.perf_counter()
    shard_set = ShardSet.open(shards_dir)
    labels_dir = Path(labels_dir).resolve()
    try:
        with output_lock(labels_dir, "recluster"):
            return _recluster_locked(started, shard_set, labels_dir, cfg, checkpoint, keep_descriptors, force,
                                     ray_address, num_cpus, actor_resources)
    except OutputLockedError as err:
        raise ReclusterError(str(err)) from None


def _recluster_locked(started: float, shard_set: ShardSet, labels_dir: Path, cfg: ReclusterConfig,
                      checkpoint: str | os.PathLike | None, keep_descriptors: bool, force: bool,
                      ray_address: str | None, num_cpus: int | None,
                      actor_resources: dict[str, float] | None) -> ReclusterSummary:
    images = load_image_cells(shard_set, cfg)
    previous, latest = _previous_version(labels_dir, cfg)
    version = next_version(labels_dir)
    params = {"config": to_dict(cfg), "shards": str(shard_set.root.resolve()),
              "shards_fingerprint": shard_set.manifest.fingerprint}
    keep_dir, sha = None, None
    if checkpoint is None:
        if previous is not None and not force:
            raise ReclusterError(
                f"{labels_dir} already holds label versions (latest v{latest:04d}); the initial split is only "
                "written once. Pass --checkpoint to recluster with an encoder, or --force to write a fresh "
                f"initial split as v{version:04d}"
            )
        clusters = initial_classes(images.image_id, images.cell_id, images.heading_deg, cfg.k, cfg.seed, cfg.n_init,
                                   rule=cfg.initial)
        distance, projection = None, None
        log.info("initial split (%s) of %d images into view classes (k=%d) -> v%04d", cfg.initial,
                 len(images.image_id), cfg.k, version)
    else:
        from placeforge.models.checkpoint import inspect_model_checkpoint

        checkpoint = Path(checkpoint).resolve()
        encoder_cfg = inspect_model_checkpoint(checkpoint)  # a wrong file fails here, before any Ray work
        sha = file_sha256(checkpoint)
        params["encoder_config"] = dataclasses.asdict(encoder_cfg)
        keep_dir = descriptor_dir(labels_dir, checkpoint, sha) if keep_descriptors else None
        plot_cells = pick_plot_cells(images.cell_id, cfg.plots_cells, cfg.seed, min_images=cfg.k)
        log.info("embedding %d images with %s (%s, %d px) and clustering them -> v%04d", len(images.image_id),
                 checkpoint.name, encoder_cfg.name, encoder_cfg.image_size, version)
        with ray_session(ray_address, num_cpus):
            rows = _embed_and_cluster(shard_set, images, checkpoint, sha, encoder_cfg.descriptor_dim, cfg, keep_dir,
                                      plot_cells, actor_resources)
        clusters, distance, projection = check_cluster_rows(rows, images, shard_set, checkpoint, sha, latest)

    relabeled = relabel(images.image_id, images.cell_id, clusters, previous)
    table = label_table(images.image_id, images.cell_id, images.cell_key, images.group_id, relabeled.class_in_cell,
                        relabeled.class_id, distance, version)
    plots: list[Path] = []  # relative to the version folder

    def write_plots(folder: Path) -> None:  # called with the version's temporary folder, before its rename
        plots.extend(_write_plots(folder, version, images, shard_set, relabeled.class_in_cell, distance, projection,
                                  cfg))

    manifest = write_label_set(
        labels_dir, table, k=cfg.k, seed=cfg.seed, cell_size_m=cfg.cell_size_m,
        previous_version=latest, retired_class_ids=relabeled.retired_class_ids,
        next_class_id=relabeled.next_class_id,
        images_changed_class=None if previous is None else relabeled.images_changed_class,
        images_new=relabeled.images_new, encoder_checkpoint=checkpoint, encoder_sha256=sha,
        method="initial" if checkpoint is None else "kmeans", params=params, extras=write_plots,
    )
    plots = [version_dir(labels_dir, version) / p for p in plots]
    return ReclusterSummary(labels_dir, manifest, plots, keep_dir, time.perf_counter() - started)


def load_image_cells(shard_set: ShardSet, cfg: ReclusterConfig) -> ImageCells:
    """Cells of every catalog image, checked against index.parquet (the same images, once each)."""
    catalog = read_catalog(shard_set.root / CATALOG_FILE)
    index = read_index(shard_set.root / INDEX_FILE)
    order = np.argsort(catalog.column("image_id").to_numpy(), kind="stable")
    catalog = catalog.take(pa.array(order))
    image_id = catalog.column("image_id").to_numpy()
    index = index.take(pa.array(np.argsort(index.column("image_id").to_numpy(), kind="stable")))
    if not np.array_equal(image_id, index.column("image_id").to_numpy()) or np.any(image_id[1:] == image_id[:-1]):
        raise ReclusterError(
            f"{shard_set.root}: {CATALOG_FILE} ({catalog.num_rows} rows) and {INDEX_FILE} ({index.num_rows} rows) "
            "do not list the same images once each; the shard set is damaged, rebuild it"
        )
    cells = cells_from_catalog(catalog, cfg.cell_size_m, cfg.cells_apart)
    members = [f"{s}.{m}" for s, m in zip(index.column("sample_key").to_pylist(), index.column("member").to_pylist())]
    return ImageCells(
        image_id=image_id,
        cell_id=cells.cell_id,
        cell_key=cells.cell_key,
        group_id=cells.group_id,
        heading_deg=catalog.column("heading_deg").to_numpy(zero_copy_only=False).astype(np.float64),
        shard_index=index.column("shard_index").to_numpy(),
        member=np.array(members, dtype=object),
    )


def _previous_version(labels_dir: Path, cfg: ReclusterConfig) -> tuple[PreviousLabels | None, int | None]:
    """The latest complete version as matching input, its file verified (a damaged one fails here)."""
    latest = latest_version(labels_dir)
    if latest is None:
        return None, None
    read_labels(labels_dir, latest, verify=True)
    previous, manifest = previous_labels(labels_dir, latest)
    if manifest.cell_size_m != cfg.cell_size_m:
        log.warning("v%04d used cells of %s m, this round %s m: images in other cells get new class ids", latest,
                    manifest.cell_size_m, cfg.cell_size_m)
    return previous, latest


def _embed_and_cluster(shard_set: ShardSet, images: ImageCells, checkpoint: Path, sha: str, descriptor_dim: int,
                       cfg: ReclusterConfig, keep_dir: Path | None, plot_cells: np.ndarray,
                       actor_resources: dict[str, float] | None = None) -> pa.Table:
    """The Ray Data job (clustering/stages.py); returns the cluster rows of every image read."""
    import ray

    from placeforge.clustering.stages import add_cells, cluster_partition, shard_image_rows
    from placeforge.models.embedding import Embedder

    quiet_data_context()
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    partitions = cfg.partitions or max(1, cpus)
    fingerprint = shard_set.manifest.fingerprint

    if keep_dir is not None and reusable(keep_dir, sha, fingerprint):
        log.info("reusing the descriptors in %s", keep_dir)
        embedded = ray.data.read_parquet(str(keep_dir), file_extensions=["parquet"])
    else:
        if keep_dir is not None and keep_dir.exists():
            raise ReclusterError(f"{keep_dir} exists but holds descriptors of another shard set; remove it")
        actors = cfg.embed_actors or (gpus if gpus else max(1, cpus // 2))
        embedded = (
            ray.data.from_items([{"shard_path": u} for u in shard_set.urls], override_num_blocks=len(shard_set.urls))
            .flat_map(shard_image_rows)
            .map_batches(
                Embedder, fn_constructor_kwargs={"checkpoint": str(checkpoint)}, batch_size=cfg.batch_size,
                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                num_gpus=1 if gpus else 0, **({"resources": actor_resources} if actor_resources else {}),
            )
        )
        if keep_dir is not None:
            embedded = _keep(embedded, keep_dir, checkpoint, sha, fingerprint, descriptor_dim)
    lookup = ray.put(CellLookup(images.image_id, images.cell_id))
    rows = (
        embedded.map_batches(add_cells, fn_kwargs={"lookup": [lookup], "partitions": partitions}, batch_format="numpy")
        .groupby("partition", num_partitions=partitions)
        .map_groups(
            cluster_partition, batch_format="numpy",
            fn_kwargs={"k": cfg.k, "seed": cfg.seed, "n_init": cfg.n_init, "niter": cfg.niter,
                       "spherical": cfg.spherical, "plot_cells": plot_cells},
        )
    )
    tables = list(rows.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(tables) if tables else pa.table({"image_id": pa.array([], pa.int64())})


def _keep(embedded, keep_dir: Path, checkpoint: Path, sha: str, fingerprint: str, descriptor_dim: int):
    """Write the descriptors once (atomically) and continue from the written files."""
    import ray

    tmp = temporary_dir(keep_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        embedded.write_parquet(str(tmp))
        meta = publish(tmp, keep_dir, str(checkpoint), sha, fingerprint, descriptor_dim)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("kept %d descriptors in %s", meta.images, keep_dir)
    return ray.data.read_parquet(str(keep_dir), file_extensions=["parquet"])


def check_cluster_rows(rows: pa.Table, images: ImageCells, shard_set: ShardSet, checkpoint: Path, sha: str,
                       latest: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the job gave every image exactly one usable row; return them in `images` order.

    Returns:
        (cluster_in_cell [N] int32, distance [N] float32, projection [N, 2] float32).
    Raises:
        ReclusterError: images missing from their shards, unknown or repeated images, or
            non-finite descriptors (a diverged checkpoint).
    """
    image_id = rows.column("image_id").to_numpy() if rows.num_rows else np.empty(0, np.int64)
    unknown = image_id[rows.column("cell_id").to_numpy() == UNKNOWN_CELL] if rows.num_rows else image_id
    if len(unknown):
        raise ReclusterError(f"{len(unknown)} image(s) in {shard_set.root / SHARD_SUBDIR} are not in "
                             f"{CATALOG_FILE} (ids {unknown[:5].tolist()}); the shard set is damaged, rebuild it")
    order = np.argsort(image_id, kind="stable")
    sorted_ids = image_id[order]
    repeated = np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]])
    if len(repeated):
        raise ReclusterError(
            f"{len(repeated)} image(s) occur more than once in the shards (ids {repeated[:5].tolist()})")
    missing = ~np.isin(images.image_id, sorted_ids)
    if missing.any():
        shards, members = images.shard_index[missing][:5], images.member[missing][:5]
        where = [f"{shard_name(int(s))}:{m}" for s, m in zip(shards, members)]
        raise ReclusterError(
            f"{int(missing.sum())} image(s) listed in {shard_set.root / INDEX_FILE} were not found in their shard "
            f"tars, e.g. {', '.join(where)}; the shard set is damaged, rebuild it"
        )
    rows = rows.take(pa.array(order))
    finite = rows.column("finite").to_numpy(zero_copy_only=False)
    if not finite.all():
        cells = np.unique(rows.column("cell_id").to_numpy()[~finite])
        kept = f"v{latest:04d} stays the latest version" if latest is not None else "no version exists yet"
        raise ReclusterError(
            f"checkpoint {checkpoint} (sha256 {sha[:12]}) gives NaN or Inf descriptors for {int((~finite).sum())} of "
            f"{len(finite)} images in {len(cells)} cell(s): the model has diverged; no label version written, {kept}"
        )
    assert np.array_equal(sorted_ids, images.image_id)  # follows from the three checks above
    projection = np.stack([rows.column("projection_x").to_numpy(), rows.column("projection_y").to_numpy()], axis=1)
    return (rows.column("class_in_cell").to_numpy().astype(np.int32), rows.column("distance").to_numpy(),
            projection.astype(np.float32))


def _write_plots(folder: Path, version: int, images: ImageCells, shard_set: ShardSet, class_in_cell: np.ndarray,
                 distance: np.ndarray | None, projection: np.ndarray | None, cfg: ReclusterConfig) -> list[Path]:
    """One PNG per sampled cell under folder/plots/ (paths returned relative to folder); images from the shards."""
    if cfg.plots_cells == 0:
        return []
    if projection is not None:  # the cells whose descriptors the job projected
        cells = np.unique(images.cell_id[np.isfinite(projection[:, 0])])
    else:
        cells = pick_plot_cells(images.cell_id, cfg.plots_cells, cfg.seed, class_in_cell=class_in_cell)
    rows = np.flatnonzero(np.isin(images.cell_id, cells))
    wanted = set(images.image_id[rows].tolist())
    jpegs: dict[int, bytes] = {}
    for shard in np.unique(images.shard_index[rows]):
        path = str(shard_set.root / SHARD_SUBDIR / shard_name(int(shard)))
        jpegs.update((i, jpeg) for i, jpeg in images_of_shard(path) if i in wanted)
    written = []
    for cell in cells:
        members = rows[images.cell_id[rows] == cell]
        classes = class_in_cell[members]
        title = (f"label v{version:04d}, cell {images.cell_key[members[0]]}: {len(members)} images, "
                 f"{len(np.unique(classes))} classes")
        name = Path("plots") / f"cell-{int(cell)}.png"
        written.append(name)
        write_cell_plot(
            folder / name, title, classes,
            [jpegs[int(i)] for i in images.image_id[members]],
            None if distance is None else distance[members],
            None if projection is None else projection[members],
        )
    return written
