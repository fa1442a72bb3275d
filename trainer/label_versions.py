"""Which label version stage "groups" trains with, and whether it fits the shard set.

    version = resolve_label_version(labels, None)   # the latest complete version
    check_label_set(shard_dir, labels, version)     # rank 0, once per version: sha256, same shard set
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from placeforge.clustering.labels import (
    LABELS_FILE,
    class_lookup,
    classes_of,
    latest_version,
    read_labels,
    read_manifest,
    version_dir,
)
from placeforge.clustering.labels import MANIFEST_FILE as LABEL_MANIFEST_FILE
from placeforge.shards.index import read_index
from placeforge.shards.layout import INDEX_FILE
from placeforge.shards.layout import MANIFEST_FILE as SHARD_MANIFEST_FILE
from placeforge.shards.reader import ShardSet


def resolve_label_version(labels_dir: str | Path, label_version: int | None = None) -> int:
    """`label_version`, or the latest complete version under `labels_dir` when None."""
    if label_version is not None:
        return int(label_version)
    version = latest_version(labels_dir)
    if version is None:
        raise FileNotFoundError(f"{labels_dir}: no complete label version to train stage 'groups' with")
    return version


def check_label_set(shard_dir: str | Path, labels_dir: str | Path, label_version: int) -> None:
    """Refuse a label version that is damaged or was made for another shard set.

    Checked: labels.parquet's sha256 against the version's manifest; the shard-set fingerprint
    the manifest records against SHARDS/manifest.json (where both have one: label sets written
    by hand record none); and that the version labels at least one image of the shards, as
    otherwise every class id is -1.  Images it does not label are only warned about.  Rank 0
    calls this once per version before training on it: it reads labels.parquet twice and the
    shard index once (seconds at 10 M images), so the loader workers skip the sha256.
    Raises:
        ValueError: one line naming the files.
    """
    table = read_labels(labels_dir, label_version, verify=True)
    manifest = read_manifest(labels_dir, label_version)
    label_manifest = version_dir(labels_dir, label_version) / LABEL_MANIFEST_FILE
    shard_manifest = Path(shard_dir) / SHARD_MANIFEST_FILE
    made_for, trained_on = manifest.shards_fingerprint, ShardSet.open(shard_dir).manifest.fingerprint
    if made_for and trained_on and made_for != trained_on:
        raise ValueError(f"{label_manifest} labels the shard set {manifest.params.get('shards', '?')} (fingerprint "
                         f"{made_for[:12]}), not {shard_manifest} (fingerprint {trained_on[:12]}); train on the shards "
                         f"it was made for, or write labels for these (pipelines/recluster.py --shards {shard_dir})")
    index = Path(shard_dir) / INDEX_FILE
    image_ids = np.sort(read_index(index).column("image_id").to_numpy())  # sorted: the lookups stay in cache
    labelled = int(np.count_nonzero(classes_of(*class_lookup(table), image_ids) >= 0))
    if labelled == 0:
        raise ValueError(f"{label_manifest.parent / LABELS_FILE} labels none of the {len(image_ids)} images in "
                         f"{index}; it was made for another shard set")
    if labelled < len(image_ids):
        warnings.warn(f"label version {label_version} ({label_manifest.parent}) has no view class for "
                      f"{len(image_ids) - labelled} of the {len(image_ids)} images in {index}; they train with "
                      "class id -1 (no CosFace term; positives by place)")
