"""Orchestration of a shard build: ingest, place, plan, one Ray task per shard, assemble.

`pipelines/build_shards.py` is the command-line shell around `build`.  State while a
build runs lives in DIR/_work: the plan, its fingerprint, and one result file set per
finished shard (index rows, rejects, record; the record is written last and marks the
shard done).  The final files are assembled from those, manifest.json last.

A plan-only build stops after the plan: it writes _work/plan.parquet and its fingerprint
(exactly what a build writes before its first shard task), catalog.parquet and
rejects.parquet as they would be if every image decoded, and plan.json last instead of
manifest.json.  It opens no image and starts no Ray.  The same command without plan-only
then builds the shards from that plan, as it resumes an interrupted build.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from placeforge.catalog import CATALOG_SCHEMA, REJECTS_SCHEMA, concat, rejects_table
from placeforge.config import Moved, flat_dict, moved, to_dict
from placeforge.fileio import (
    OutputLockedError,
    output_lock,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)
from placeforge.places import PlaceConfig, place_rows, with_places
from placeforge.raysession import quiet_data_context, ray_session
from placeforge.shards.index import INDEX_SCHEMA, write_index
from placeforge.shards.layout import (
    CATALOG_FILE,
    INDEX_FILE,
    REJECTS_FILE,
    SHARD_SUBDIR,
    WORK_SUBDIR,
    shard_name,
)
from placeforge.shards.manifest import (
    PLAN_RECORD_FILE,
    Manifest,
    PlanRecord,
    ShardRecord,
    read_manifest,
    write_manifest,
    write_plan_record,
)
from placeforge.shards.outdir import (
    FINGERPRINT_FILE,
    PLAN_FILE,
    OutDirError,
    claim_out_dir,
    remove_empty_dir,
    remove_owned,
    shard_done,
    temp_files,
    work_files,
)
from placeforge.shards.plan import plan_rows

log = logging.getLogger(__name__)


PLAN_ROW_GROUP_ROWS = 65_536  # rows per row group of _work/plan.parquet: ~32 shards of the default 2,000 images


class BuildError(RuntimeError):
    """The build cannot start or finish; the message says what to do."""


@dataclass(frozen=True)
class BuildConfig:
    # The place keys were flat until 2026-11-30; older files, flags and manifests read at their new place.
    MOVED: ClassVar[dict[str, Moved]] = {
        key: moved(f"places.{key}") for key in ("cell_size_m", "heading_sectors", "min_images_per_place",
                                                "view_radius_m")}

    places: PlaceConfig = field(
        default_factory=PlaceConfig, metadata={"help": "how images become places: UTM cells, compass sectors, "
                                                       "views (placeforge.places)"})
    max_images_per_sample: int = field(default=16, metadata={"help": "bigger places are split into parts"})
    images_per_shard: int = field(default=2000, metadata={"help": "target images per shard"})
    min_shards: int = field(default=16, metadata={"help": "at least this many shards (>= ranks x loader workers)"})
    short_side: int = field(default=320, metadata={"help": "resize so the short side is this many pixels"})
    jpeg_quality: int = field(default=90, metadata={"help": "JPEG quality of re-encoded images"})
    seed: int = field(default=0, metadata={"help": "seed of the sample split and shard shuffle"})

    def validate(self) -> None:
        self.places.validate()
        for name in ("max_images_per_sample", "images_per_shard", "min_shards", "short_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class BuildSummary:
    out_dir: Path
    manifest: Manifest
    resumed_shards: int
    seconds: float
    skipped: bool = False  # the set was already complete

    def report(self) -> str:
        c = self.manifest.counts
        lines = [
            f"shard set: {self.out_dir}",
            f"inputs {c['inputs']} = in shards {c['in_shards']} + rejected {c['rejected']}",
            f"places {c['places']}, samples {c['samples']}, shards {c['shards']}, "
            f"{sum(s.bytes for s in self.manifest.shards) / 1e6:.1f} MB",
        ]
        for reason, n in sorted(c["rejected_by_reason"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  rejected {reason}: {n}")
        if self.skipped:
            lines.append("already complete with the same config and inputs: nothing to do")
        else:
            done = f" ({self.resumed_shards} shards kept from an interrupted run)" if self.resumed_shards else ""
            lines.append(f"built in {self.seconds:.1f} s{done}")
        lines += [f"warning: {w}" for w in self.manifest.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class PlanSummary:
    """The result of a plan-only build: what a build of the same arguments would make."""

    out_dir: Path
    record: PlanRecord
    phase_seconds: dict[str, float]  # ingest, places, plan, write
    seconds: float

    def report(self) -> str:
        c = self.record.counts
        lines = [
            f"shard-set plan: {self.out_dir} (plan only: no image opened, no shard written)",
            f"inputs {c['inputs']} = planned {c['planned']} + rejected {c['rejected']}",
            f"places {c['places']}, samples {c['samples']}, shards {c['shards']}",
        ]
        for reason, n in sorted(c["rejected_by_reason"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  rejected {reason}: {n}")
        phases = ", ".join(f"{name} {s:.1f} s" for name, s in self.phase_seconds.items())
        lines += [f"planned in {self.seconds:.1f} s ({phases})",
                  "the same command without --plan-only builds these shards from this plan; images that "
                  "cannot be read or decoded are rejected then"]
        return "\n".join(lines)


@contextlib.contextmanager
def _phase(phase_seconds: dict[str, float], name: str):
    started = time.perf_counter()
    yield
    phase_seconds[name] = time.perf_counter() - started
    log.info("%s phase done in %.1f s", name, phase_seconds[name])


def build(
    sources: list[tuple[str, Path] | tuple[str, Path, Path | None]],
    out_dir: str | os.PathLike,
    cfg: BuildConfig,
    overwrite: bool = False,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    task_resources: dict[str, float] | None = None,
    plan_only: bool = False,
) -> BuildSummary | PlanSummary:
    """Build (or resume, or confirm) the shard set in `out_dir` from `sources`.

    A source is (format, root) or (format, root, file_list), e.g. placeforge.ingest.Source;
    with a file list its files are not walked or stat'ed, and a listed file that is missing
    is rejected (unreadable, "... does not exist") when its shard task reads it.

    `task_resources`: custom Ray resources every shard task asks for (placeforge.raysession.
    parse_resources), e.g. to keep decode work on CPU nodes; not part of the build's config.

    `plan_only`: stop after ingest, places and plan, write them (see the module docstring) and
    return a PlanSummary; a complete shard set of the same fingerprint is left as it is.
    """
    started = time.perf_counter()
    out = Path(out_dir).resolve()
    phase_seconds: dict[str, float] = {}
    with _phase(phase_seconds, "ingest"):
        catalog, paths, rejects, inputs = _ingest_rows(sources)  # `path` is made again in plan order
    with _phase(phase_seconds, "places"):
        placement = place_rows(catalog, cfg.places)
        rejects = concat([rejects, placement.rejects], REJECTS_SCHEMA)
    with _phase(phase_seconds, "plan"):
        # As plan_shards(assign_places(catalog)), planned on the place ids alone: the wide rows are
        # copied once, into plan order, column by column as the catalog's columns are dropped.
        kept_rows = np.flatnonzero(placement.kept)
        sort, plan_columns = plan_rows(placement.place_id, cfg.max_images_per_sample, cfg.images_per_shard,
                                       cfg.min_shards, cfg.seed)
        holder = [catalog]
        del catalog
        taken = paths.add_to(_take_releasing(holder, kept_rows[sort]), kept_rows[sort])
        plan = with_places(taken, placement, order=sort)
        del taken
        for name, values in plan_columns.items():
            plan = plan.append_column(name, values)
        fingerprint = _fingerprint(cfg, sources, plan)

    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    try:
        with output_lock(out, "build_shards"):
            if claim_out_dir(out, fingerprint, overwrite):
                return BuildSummary(out, read_manifest(out), 0, time.perf_counter() - started, skipped=True)
            work = out / WORK_SUBDIR
            with _phase(phase_seconds, "write"):
                if not (work / FINGERPRINT_FILE).is_file():
                    # Sorted by shard, so each task's filtered read touches one or two row groups,
                    # small ones: at 5.5 M rows a task decoded a whole ~1 M-row group (0.94 CPU s),
                    # now 64 Ki rows (0.07 CPU s; the file ~7 % bigger; docs/benchmarks.md).
                    write_parquet_atomic(plan, work / PLAN_FILE, row_group_size=PLAN_ROW_GROUP_ROWS)
                    write_text_atomic(work / FINGERPRINT_FILE, fingerprint + "\n")  # marks _work/ as this build's
                if plan_only:
                    record = _write_plan(out, plan, rejects, inputs, cfg, sources, fingerprint)
            if plan_only:
                return PlanSummary(out, record, phase_seconds, time.perf_counter() - started)
            num_shards = int(pc.max(plan.column("shard_index")).as_py()) + 1
            done = {i for i in range(num_shards) if shard_done(out, i)}
            todo = [i for i in range(num_shards) if i not in done]
            log.info("%d inputs, %d images planned into %d shards; %d to build", inputs, plan.num_rows, num_shards,
                     len(todo))
            if todo:
                _run_shard_tasks(out, todo, cfg, ray_address, num_cpus, task_resources)
            manifest = _assemble(out, plan, rejects, inputs, num_shards, cfg, sources, fingerprint)
            # plan.json of a plan-only run is superseded by manifest.json
            remove_owned([*work_files(work, range(num_shards)), *temp_files(work), out / PLAN_RECORD_FILE])
            remove_empty_dir(work)
    except (OutputLockedError, OutDirError) as err:
        raise BuildError(str(err)) from None
    return BuildSummary(out, manifest, len(done), time.perf_counter() - started)


def _take_releasing(holder: list[pa.Table], indices: np.ndarray) -> pa.Table:
    """`table.take(indices)` of the one table in `holder`, which is emptied: the table's columns are
    dropped as they are taken, so at 5 M rows the wide rows exist about once, not twice."""
    table = holder.pop()
    schema, taken, where = table.schema, [], pa.array(indices)
    pool = pa.default_memory_pool()
    for _ in schema.names:
        column = table.column(0)
        table = table.remove_column(0)
        if column.num_chunks > 1:  # (one per source) take() would join them itself, beside its result
            column = column.combine_chunks()
        taken.append(column.take(where))
        del column  # the last reference to that column: its buffers are freed
        pool.release_unused()  # and handed back now, so that the next column's copy can use them
    return pa.Table.from_arrays(taken, schema=schema)


@dataclass(frozen=True)
class _Paths:
    """The `path` column of a catalog as what it is made of: each source's folder prefix and its
    rows' relpaths (ingest.common.path_prefix).  The widest column is then not held, converted and
    taken with the others (at 5 M rows ~0.75 GB, and up to three copies while it is taken): it is
    made once, in plan order, from the plan's relpaths."""

    prefixes: list[str]  # [S] root + "/" of each source
    source_of: np.ndarray  # [N] int32: the source of each catalog row

    def add_to(self, table: pa.Table, rows: np.ndarray) -> pa.Table:
        """`table` (catalog columns but `path`; [K] rows, catalog rows `rows`) with `path` in its place."""
        column = table.column("relpath")
        relpath = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # (which copies even one)
        source_of = self.source_of[rows]
        if not len(source_of) or (source_of == source_of[0]).all():
            prefix = self.prefixes[source_of[0]] if len(source_of) else ""
        else:  # [K] prefixes, ~40 bytes a row: less than a second copy of the paths would take
            prefix = pa.array(self.prefixes, pa.string()).take(pa.array(source_of))
        path = pc.binary_join_element_wise(prefix, relpath, "")
        del prefix
        # With the all-valid bitmap that `take` gives a column, as the fingerprint hashes the buffers.
        valid = pa.py_buffer(np.packbits(np.ones(len(path), dtype=bool), bitorder="little"))
        path = pa.Array.from_buffers(pa.string(), len(path), [valid, *path.buffers()[1:]], null_count=-1)
        return table.add_column(CATALOG_SCHEMA.get_field_index("path"), CATALOG_SCHEMA.field("path"), path)


def _ingest(sources: list[tuple]) -> tuple[pa.Table, pa.Table, int]:
    """Read every source (all are checked before any work starts) and drop cross-source duplicates."""
    catalog, paths, rejects, inputs = _ingest_rows(sources)
    return paths.add_to(catalog, np.arange(catalog.num_rows)), rejects, inputs


def _ingest_rows(sources: list[tuple]) -> tuple[pa.Table, _Paths, pa.Table, int]:
    """`_ingest` with the catalog's `path` column set aside as `_Paths`."""
    from placeforge.ingest import read_source
    from placeforge.ingest.common import path_prefix

    if not sources:
        raise BuildError("no --source given")
    results = [read_source(*source) for source in sources]
    prefixes = [path_prefix(source[1]) for source in sources]
    for result, prefix in zip(results, prefixes):  # (ingest.common.finish makes them so; lengths are cheap to check)
        path, relpath = result.catalog.column("path"), result.catalog.column("relpath")
        lengths = pc.equal(pc.binary_length(path), pc.add(pc.binary_length(relpath), len(prefix.encode())))
        if len(path) and (path[0].as_py() != prefix + relpath[0].as_py() or not pc.all(lengths).as_py()):
            raise BuildError(f"a reader's paths are not {prefix!r} + relpath; please report this")
    source_of = np.repeat(np.arange(len(results), dtype=np.int32), [r.catalog.num_rows for r in results])
    catalog = concat([r.catalog for r in results], CATALOG_SCHEMA)
    rejects = concat([r.rejects for r in results], REJECTS_SCHEMA)
    inputs = sum(r.inputs for r in results)
    del results
    # The same folder given twice, or one dataset reachable under two names: keep the first.  Two
    # sources' paths can only coincide where one's root + "/" starts the other's.
    dup = ~pl.from_arrow(catalog.select(["image_id"]))["image_id"].is_first_distinct()
    nested = any(a.startswith(b) for i, a in enumerate(prefixes) for j, b in enumerate(prefixes) if i != j)
    if nested:
        dup = dup | ~pl.from_arrow(catalog.select(["path"]))["path"].is_first_distinct()
    dup = dup.to_numpy()
    if dup.any():
        dups = catalog.filter(pa.array(dup))
        rejects = concat(
            [
                rejects,
                rejects_table(
                    {
                        "input": r["relpath"],
                        "source": r["source"],
                        "dataset": r["dataset"],
                        "stage": "ingest",
                        "reason": "duplicate",
                        "detail": "the same image was given by more than one --source",
                        "image_id": r["image_id"],
                    }
                    for r in dups.to_pylist()
                ),
            ],
            REJECTS_SCHEMA,
        )
        catalog = catalog.filter(pa.array(~dup))
        source_of = source_of[~dup]
    catalog = catalog.drop_columns(["path"])
    pa.default_memory_pool().release_unused()
    return catalog, _Paths(prefixes, source_of), rejects, inputs


def fingerprint_settings(cfg: BuildConfig) -> dict:
    """The settings as the fingerprint hashes them: one level, each key its leaf name (`cell_size_m`,
    not `places.cell_size_m`), as before the places section, so a shard set built before it keeps
    its fingerprint and a re-run still finds it complete."""
    return {path.rsplit(".", 1)[-1]: value for path, value in flat_dict(to_dict(cfg)).items()}


def _fingerprint(cfg: BuildConfig, sources: list[tuple], plan: pa.Table) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(fingerprint_settings(cfg), sort_keys=True).encode())
    # [format, root] as before file lists existed, so older interrupted builds still resume
    paths = [[s[0], *(str(Path(p).resolve()) for p in s[1:] if p is not None)] for s in sources]
    digest.update(json.dumps(paths).encode())
    for name in ("image_id", "path", "shard_index", "sample_key", "member"):
        digest.update(name.encode())
        for chunk in plan.column(name).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    digest.update(buf)
    return digest.hexdigest()


def build_one_shard(row: dict, out_dir: str, short_side: int, jpeg_quality: int) -> dict:
    """Ray Data map function: build shard row["shard_index"] and record its results."""
    from placeforge.shards.writer import write_shard

    shard_index = int(row["shard_index"])
    out = Path(out_dir)
    work = out / WORK_SUBDIR
    plan = pq.read_table(work / PLAN_FILE, filters=[("shard_index", "=", shard_index)])
    result = write_shard(out / SHARD_SUBDIR, shard_index, plan, short_side, jpeg_quality)
    name = shard_name(shard_index)
    write_parquet_atomic(pa.Table.from_pylist(result.index_rows, schema=INDEX_SCHEMA), work / f"{name}.index.parquet")
    write_parquet_atomic(rejects_table(result.reject_rows), work / f"{name}.rejects.parquet")
    write_json_atomic(work / f"{name}.record.json", asdict(result.record))  # written last: marks the shard done
    return {"shard_index": shard_index, "images": result.record.images, "rejects": len(result.reject_rows)}


def _run_shard_tasks(out: Path, todo: list[int], cfg: BuildConfig, ray_address: str | None, num_cpus: int | None,
                     task_resources: dict[str, float] | None = None) -> None:
    import ray
    from tqdm import tqdm

    with ray_session(ray_address, num_cpus):
        quiet_data_context()
        ds = ray.data.from_items([{"shard_index": i} for i in todo], override_num_blocks=len(todo))
        ds = ds.map(
            build_one_shard,
            fn_kwargs={"out_dir": str(out), "short_side": cfg.short_side, "jpeg_quality": cfg.jpeg_quality},
            num_cpus=1,
            **({"resources": task_resources} if task_resources else {}),
        )
        try:
            with tqdm(total=len(todo), desc="shards", unit="shard") as bar:
                for row in ds.iter_rows():
                    bar.update(1)
                    bar.set_postfix(images=row["images"], rejects=row["rejects"])
        except Exception as error:  # a task failed after Ray's retries: a full disk, a lost node, ...
            cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise BuildError(f"a shard task failed: {cause}. The shards finished so far are kept; fix the "
                             f"cause and re-run the same command to resume") from error


def _write_plan(
    out: Path,
    plan: pa.Table,
    rejects: pa.Table,
    inputs: int,
    cfg: BuildConfig,
    sources: list[tuple],
    fingerprint: str,
) -> PlanRecord:
    """Write the catalog and rejects a build of `plan` would give if every image decoded, then plan.json."""
    from placeforge.ingest import Source

    if inputs != plan.num_rows + rejects.num_rows:
        raise BuildError(f"accounting error: {inputs} inputs but {plan.num_rows} planned and "
                         f"{rejects.num_rows} rejected; please report this")
    places = pl.from_arrow(plan.select(["place_id"])).n_unique()
    samples = pl.from_arrow(plan.select(["sample_index"])).n_unique()
    by_reason = pl.from_arrow(rejects.select(["reason"])).group_by("reason").len()
    counts = {
        "inputs": inputs,
        "planned": plan.num_rows,
        "rejected": rejects.num_rows,
        "rejected_by_reason": dict(sorted(by_reason.iter_rows())),
        "places": places,
        "samples": samples,
        "shards": int(pc.max(plan.column("shard_index")).as_py()) + 1,
    }
    write_parquet_atomic(plan.select(CATALOG_SCHEMA.names).cast(CATALOG_SCHEMA), out / CATALOG_FILE)
    write_parquet_atomic(rejects, out / REJECTS_FILE)
    record = PlanRecord(
        config=to_dict(cfg),
        sources=[Source(*s).label() for s in sources],
        counts=counts,
        fingerprint=fingerprint,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    write_plan_record(record, out)  # last: marks the plan complete
    return record


def _assemble(
    out: Path,
    plan: pa.Table,
    rejects: pa.Table,
    inputs: int,
    num_shards: int,
    cfg: BuildConfig,
    sources: list[tuple],
    fingerprint: str,
) -> Manifest:
    from placeforge.ingest import Source

    work = out / WORK_SUBDIR
    records, index_parts, reject_parts = [], [], [rejects]
    for i in range(num_shards):
        name = shard_name(i)
        records.append(ShardRecord(**json.loads((work / f"{name}.record.json").read_text())))
        index_parts.append(pq.read_table(work / f"{name}.index.parquet"))
        reject_parts.append(pq.read_table(work / f"{name}.rejects.parquet"))
    index = concat(index_parts, INDEX_SCHEMA)
    rejects = concat(reject_parts, REJECTS_SCHEMA)
    in_shards = pc.is_in(plan.column("image_id"), value_set=index.column("image_id"))
    catalog = plan.filter(in_shards).select(CATALOG_SCHEMA.names).cast(CATALOG_SCHEMA)
    if inputs != catalog.num_rows + rejects.num_rows or catalog.num_rows != index.num_rows:
        raise BuildError(
            f"accounting error: {inputs} inputs but {catalog.num_rows} in the catalog, "
            f"{index.num_rows} in the index and {rejects.num_rows} rejected; please report this"
        )
    by_reason = Counter(rejects.column("reason").to_pylist())
    warnings = []
    digests = pl.from_arrow(index.select(["source_sha1", "place_id"]))
    shared = digests.group_by("source_sha1").agg(pl.col("place_id").n_unique().alias("n")).filter(pl.col("n") > 1)
    if shared.height:
        warnings.append(f"{shared.height} image contents appear in more than one place (kept; see index.parquet source_sha1)")
    empty = [r.name for r in records if r.images == 0]
    if empty:
        warnings.append(f"{len(empty)} shard(s) ended up with no images: {empty[:5]}")
    counts = {
        "inputs": inputs,
        "in_shards": catalog.num_rows,
        "rejected": rejects.num_rows,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "places": len(set(catalog.column("place_id").to_pylist())),
        "samples": sum(r.samples for r in records),
        "shards": num_shards,
    }
    write_parquet_atomic(catalog, out / CATALOG_FILE)
    write_parquet_atomic(rejects, out / REJECTS_FILE)
    write_index(index, out / INDEX_FILE)
    manifest = Manifest(
        config=to_dict(cfg),
        sources=[Source(*s).label() for s in sources],
        counts=counts,
        shards=records,
        fingerprint=fingerprint,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        warnings=warnings,
    )
    write_manifest(manifest, out)
    return manifest
