"""Per-cell K-means throughput and full relabel cost; prints markdown tables.

    .venv/bin/python benchmarks/bench_clustering.py [--images 200000] [--sizes 50000,100000,200000,400000]
        [--sklearn-cells 2000] [--dim 512]

Data: cells of 5-30 images (uniform), 512-d float32, L2-normalised.  Each cell has 3
random view prototypes and each image is a prototype plus Gaussian noise of norm ~0.8,
so K-means has views to find; the "next round" descriptors add a drift of norm ~0.3
(an encoder that has moved a little between rounds).

(a) cells/s of `cluster_cells` (faiss, n_init 10, 1 thread) against a loop of
    sklearn KMeans(n_clusters=3, n_init=10) per cell (MutualVPR's loop) on the same first
    cells, with sklearn on 1 thread and at its default thread count; the ratio is taken
    against the faster of the two.  Goal >= 10x.
(b) one full relabel: read the previous version, K-means, previous classes' means
    under the new descriptors, matching + global ids, Parquet write of the new version.
    Time from an untraced run; peak memory from a second run under tracemalloc (numpy and
    Python allocations; faiss's small per-cell C++ buffers are not counted).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from placeforge.clustering.kmeans import class_means, cluster_cells
from placeforge.clustering.labels import label_table, previous_labels, write_label_set
from placeforge.clustering.matching import relabel

K = 3
N_INIT = 10


def synthetic(n_images: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Cells of 5-30 images with 3 views each; two rounds of descriptors [N, D] float32."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 31, n_images // 5 + 1)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n_images)) + 1]
    sizes[-1] -= int(sizes.sum()) - n_images
    cells = len(sizes)
    cell_of_image = np.repeat(np.arange(cells), sizes)
    view = rng.integers(0, K, n_images)
    prototypes = _unit(rng.standard_normal((cells * K, dim), dtype=np.float32))
    noise_std = np.float32(0.8 / np.sqrt(dim))
    first = prototypes[cell_of_image * K + view]
    first += noise_std * rng.standard_normal((n_images, dim), dtype=np.float32)
    first = _unit(first)
    second = first + np.float32(0.3 / np.sqrt(dim)) * rng.standard_normal((n_images, dim), dtype=np.float32)
    cell_keys = np.array([f"utm:10N:{55000 + c // 1000}:{418000 + c % 1000}" for c in range(cells)], dtype=object)
    return {
        "image_id": rng.permutation(n_images).astype(np.int64) * 7919 + 13,
        "cell_id": (np.arange(cells, dtype=np.int64) * 1_000_003 + 17)[cell_of_image],
        "cell_key": cell_keys[cell_of_image],
        "group_id": (np.arange(cells) % 25)[cell_of_image].astype(np.int32),
        "first": first,
        "second": _unit(second),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def first_cells(cell_id: np.ndarray, count: int) -> np.ndarray:
    """Rows of the first `count` cells (rows of a cell are contiguous here)."""
    cells = np.unique(cell_id)[:count]
    return np.flatnonzero(np.isin(cell_id, cells))


def bench_sklearn(cell_id: np.ndarray, x: np.ndarray, threads: int | None) -> tuple[float, float]:
    """(seconds, total inertia) of KMeans(n_clusters=3, n_init=10) per cell, MutualVPR's loop."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    starts = np.flatnonzero(np.r_[True, cell_id[1:] != cell_id[:-1]])
    bounds = np.append(starts, len(cell_id))
    inertia = 0.0
    with threadpool_limits(limits=threads):
        started = time.perf_counter()
        for s, e in zip(bounds[:-1], bounds[1:]):
            model = KMeans(n_clusters=K, n_init=N_INIT, random_state=0).fit(x[s:e])
            inertia += float(model.inertia_)
        return time.perf_counter() - started, inertia


def throughput(data: dict[str, np.ndarray], sklearn_cells: int, default_thread_cells: int) -> list[str]:
    cell_id, x = data["cell_id"], data["first"]
    cells = len(np.unique(cell_id))
    started = time.perf_counter()
    cluster_cells(cell_id, x, k=K, seed=0, n_init=N_INIT)
    ours_all = cells / (time.perf_counter() - started)
    rows = first_cells(cell_id, sklearn_cells)
    started = time.perf_counter()
    subset = cluster_cells(cell_id[rows], x[rows], k=K, seed=0, n_init=N_INIT)
    ours_subset = sklearn_cells / (time.perf_counter() - started)
    ours_inertia = float((subset.distance.astype(np.float64) ** 2).sum())
    sk_one, sk_inertia = bench_sklearn(cell_id[rows], x[rows], threads=1)
    # sklearn with its default OpenMP threads is far slower on tiny cells (thread start-up
    # per fit), so it is timed on a few cells only and the ratio uses the faster 1-thread loop.
    few = first_cells(cell_id, default_thread_cells)
    sk_default, _ = bench_sklearn(cell_id[few], x[few], threads=None)
    sklearn_best = max(sklearn_cells / sk_one, default_thread_cells / sk_default)
    return [
        "| what | cells | cells/s | vs sklearn |",
        "|---|---:|---:|---:|",
        f"| placeforge `cluster_cells` (faiss, n_init {N_INIT}, 1 thread), all cells | {cells:,} | {ours_all:,.0f} "
        f"| {ours_all / sklearn_best:.1f}x |",
        f"| placeforge `cluster_cells`, first {sklearn_cells:,} cells | {sklearn_cells:,} | {ours_subset:,.0f} "
        f"| {ours_subset / sklearn_best:.1f}x |",
        f"| sklearn KMeans(3, n_init={N_INIT}) loop, default threads | {default_thread_cells:,} "
        f"| {default_thread_cells / sk_default:,.0f} | |",
        f"| sklearn KMeans(3, n_init={N_INIT}) loop, 1 thread | {sklearn_cells:,} | {sklearn_cells / sk_one:,.0f} | |",
        "",
        f"Inertia on the first {sklearn_cells:,} cells (sum of squared distances to centroids): "
        f"placeforge {ours_inertia:.2f}, sklearn {sk_inertia:.2f} (ratio {ours_inertia / sk_inertia:.4f}).",
    ]


def one_relabel(root: Path, data: dict[str, np.ndarray], version: int) -> dict[str, float]:
    """Relabel `data["second"]` against `version - 1` under `root`; seconds per phase."""
    times = {}
    started = time.perf_counter()
    previous, manifest = previous_labels(root, version - 1)
    times["read"] = time.perf_counter() - started

    started = time.perf_counter()
    clusters = cluster_cells(data["cell_id"], data["second"], k=K, seed=version, n_init=N_INIT)
    times["kmeans"] = time.perf_counter() - started

    started = time.perf_counter()
    # The previous classes seen through the current encoder, for matching tie-breaks; the
    # previous table is sorted by image id, so look the images up in it.
    order = np.argsort(previous.image_id)
    pos = np.searchsorted(previous.image_id, data["image_id"], sorter=order)
    old_slot = previous.class_in_cell[order[pos]]
    old_centroids = class_means(data["cell_id"], old_slot, data["second"])
    result = relabel(data["image_id"], data["cell_id"], clusters.class_in_cell, previous,
                     clusters.centroids, old_centroids)
    times["match"] = time.perf_counter() - started

    started = time.perf_counter()
    table = label_table(data["image_id"], data["cell_id"], data["cell_key"], data["group_id"],
                        result.class_in_cell, result.class_id, clusters.distance, version)
    write_label_set(root, table, k=K, seed=version, cell_size_m=10.0, previous_version=manifest.version,
                    retired_class_ids=result.retired_class_ids, next_class_id=result.next_class_id,
                    images_changed_class=result.images_changed_class, images_new=result.images_new,
                    params={"n_init": N_INIT})
    times["write"] = time.perf_counter() - started
    times["changed"] = result.images_changed_class / len(table)
    return times


def scaling(sizes: list[int], dim: int) -> list[str]:
    lines = [
        "| images | cells | total s | read s | K-means s | match s | write s | changed | "
        "peak traced MiB | MiB / 1k images | inputs MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        data = synthetic(size, dim, seed=size)
        with tempfile.TemporaryDirectory(prefix="bench-labels-") as tmp:
            root = Path(tmp)
            first = cluster_cells(data["cell_id"], data["first"], k=K, seed=0, n_init=N_INIT)
            start = relabel(data["image_id"], data["cell_id"], first.class_in_cell, None)
            write_label_set(
                root,
                label_table(data["image_id"], data["cell_id"], data["cell_key"], data["group_id"],
                            start.class_in_cell, start.class_id, first.distance, 0),
                k=K, seed=0, cell_size_m=10.0, previous_version=None, retired_class_ids=[],
                next_class_id=start.next_class_id, images_changed_class=None, images_new=size,
            )
            times = one_relabel(root, data, version=1)
            tracemalloc.start()
            one_relabel(root, data, version=2)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        total = sum(v for k, v in times.items() if k != "changed")
        inputs = (data["first"].nbytes + data["second"].nbytes) / 2**20
        cells = len(np.unique(data["cell_id"]))
        lines.append(
            f"| {size:,} | {cells:,} | {total:.2f} | {times['read']:.2f} | {times['kmeans']:.2f} | "
            f"{times['match']:.2f} | {times['write']:.2f} | {times['changed']:.1%} | {peak / 2**20:,.0f} | "
            f"{peak / 2**20 / (size / 1000):.2f} | {inputs:,.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000, help="images for the throughput table")
    parser.add_argument("--sizes", default="50000,100000,200000,400000", help="image counts for the scaling table")
    parser.add_argument("--sklearn-cells", type=int, default=2000, help="cells timed with sklearn, 1 thread")
    parser.add_argument("--sklearn-default-thread-cells", type=int, default=100,
                        help="cells timed with sklearn at its default thread count (slow on tiny cells)")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"\n## (a) per-cell K-means throughput ({args.images:,} images, {args.dim}-d)\n")
    data = synthetic(args.images, args.dim, seed=0)
    print("\n".join(throughput(data, args.sklearn_cells, args.sklearn_default_thread_cells)))
    del data
    print(f"\n## (b) full relabel (K-means + matching + Parquet write), {args.dim}-d\n")
    print("\n".join(scaling([int(s) for s in args.sizes.split(",") if s], args.dim)))
    print(f"\nprocess peak RSS (ru_maxrss, whole run incl. inputs): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
