"""build_shards.py --plan-only: ingest, places and plan written with no image opened; a build follows it.

The image files of the fixture are garbage bytes while the plan is made: a plan that opened
one would reject it (decode_error).  Only the last test starts Ray (marked `ray`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from placeforge.fileio import file_sha256
from placeforge.pipelines.build_shards import main
from placeforge.shards.layout import MANIFEST_FILE, WORK_SUBDIR
from placeforge.shards.manifest import PLAN_RECORD_FILE, read_manifest, read_plan_record
from tests.conftest import at_name, jpeg_bytes

ARGS = ["--min-shards", "2", "--images-per-shard", "8", "--short-side", "48"]
GOOD = 5 + 6 + 7  # images in the three places
REASONS = {"not_an_image": 1, "bad_name": 1, "bad_coordinates": 1, "place_too_small": 2, "duplicate": 1}


@pytest.fixture
def garbage_city(tmp_path: Path) -> dict:
    """An @-folder whose images are not JPEGs at all, in three places, with bad inputs of every
    kind ingest and places find, and a file list that names one image twice."""
    root = tmp_path / "city_at"
    (root / "train").mkdir(parents=True)
    images = []
    for place, count in enumerate([5, 6, 7]):
        for i in range(count):
            images.append("train/" + at_name(551_007.0 + place * 100.0 + i * 0.5, 4_180_007.0 + i * 0.3))
    images += ["train/" + at_name(553_007.0 + i, 4_180_007.0) for i in range(2)]  # a place of 2: too small
    for relpath in images:
        (root / relpath).write_bytes(b"not a jpeg: opening this would be a decode_error")
    others = ["train/notes.txt", "train/@1@2@.jpg", "train/@nan@nan@10@S@nan@nan@pano@@@@@@201905@@.jpg"]
    for relpath in others:
        (root / relpath).write_bytes(b"garbage")
    file_list = tmp_path / "files.txt"
    file_list.write_text("\n".join([*images, *others, images[0]]) + "\n")
    return {"root": root, "list": file_list, "images": images, "inputs": len(images) + len(others) + 1}


def _run(city: dict, out: Path, *extra: str) -> int:
    return main(["--source", f"atname:{city['root']}", str(city["list"]), "--out", str(out), *ARGS, *extra])


def test_plan_rows_come_in_small_row_groups_by_shard(garbage_city, tmp_path, monkeypatch):
    """A shard task's filtered read of _work/plan.parquet should decode a row group or two, not the
    whole plan: groups are PLAN_ROW_GROUP_ROWS rows, the rows sorted by shard."""
    import placeforge.shards.build as build_module

    monkeypatch.setattr(build_module, "PLAN_ROW_GROUP_ROWS", 4)
    out = tmp_path / "out"
    assert _run(garbage_city, out, "--plan-only") == 0
    plan_file = pq.ParquetFile(out / WORK_SUBDIR / "plan.parquet")
    sizes = [plan_file.metadata.row_group(i).num_rows for i in range(plan_file.metadata.num_row_groups)]
    assert sizes == [4, 4, 4, 4, 2]  # GOOD = 18 rows
    shard_of_group = [plan_file.read_row_group(i, columns=["shard_index"]).column(0).to_pylist()
                      for i in range(len(sizes))]
    flat = [s for group in shard_of_group for s in group]
    assert flat == sorted(flat)
    for shard in set(flat):  # the filtered read the shard task does gives exactly that shard's rows
        rows = pq.read_table(out / WORK_SUBDIR / "plan.parquet", filters=[("shard_index", "=", shard)])
        assert rows.num_rows == flat.count(shard)


def test_plan_only_opens_no_image_and_its_counts_add_up(garbage_city, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(garbage_city, out, "--plan-only") == 0
    printed = capsys.readouterr().out
    rejected = sum(REASONS.values())
    assert f"inputs {garbage_city['inputs']} = planned {GOOD} + rejected {rejected}" in printed

    catalog = pq.read_table(out / "catalog.parquet")
    rejects = pq.read_table(out / "rejects.parquet")
    plan = pq.read_table(out / WORK_SUBDIR / "plan.parquet")
    assert catalog.num_rows == plan.num_rows == GOOD
    assert catalog.num_rows + rejects.num_rows == garbage_city["inputs"]
    by_reason = {r: rejects["reason"].to_pylist().count(r) for r in set(rejects["reason"].to_pylist())}
    assert by_reason == REASONS  # no decode_error, no unreadable: no image was opened
    assert set(rejects["stage"].to_pylist()) == {"ingest", "place"}
    assert len(set(catalog["place_id"].to_pylist())) == 3

    record = read_plan_record(out)
    assert record.counts["inputs"] == garbage_city["inputs"] and record.counts["planned"] == GOOD
    assert record.counts["rejected_by_reason"] == REASONS and record.counts["places"] == 3
    assert record.counts["shards"] == len(set(plan["shard_index"].to_pylist())) == 3  # 18 images, 8 a shard
    # A plan is not a shard set: nothing reads it as one.
    assert not (out / MANIFEST_FILE).exists() and not list(out.glob("shards/*.tar"))
    with pytest.raises(FileNotFoundError, match="not a complete shard set"):
        read_manifest(out)


def test_plan_only_rerun_is_reproducible_and_a_changed_config_refuses(garbage_city, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(garbage_city, out, "--plan-only") == 0
    files = ("catalog.parquet", "rejects.parquet", f"{WORK_SUBDIR}/plan.parquet", f"{WORK_SUBDIR}/fingerprint")
    first = {name: file_sha256(out / name) for name in files}
    record = json.loads((out / PLAN_RECORD_FILE).read_text())
    assert _run(garbage_city, out, "--plan-only") == 0
    assert {name: file_sha256(out / name) for name in files} == first
    again = json.loads((out / PLAN_RECORD_FILE).read_text())
    assert {k: v for k, v in again.items() if k != "created_at"} == {k: v for k, v in record.items() if k != "created_at"}

    capsys.readouterr()
    assert _run(garbage_city, out, "--plan-only", "--seed", "3") == 2
    assert "plan (--plan-only) with another config" in capsys.readouterr().err
    assert _run(garbage_city, out, "--plan-only", "--seed", "3", "--overwrite") == 0
    assert read_plan_record(out).config["seed"] == 3 and read_plan_record(out).fingerprint != record["fingerprint"]


@pytest.mark.ray
def test_a_build_after_the_plan_builds_exactly_that_plan(local_ray, garbage_city, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(garbage_city, out, "--plan-only") == 0
    plan = read_plan_record(out)
    planned = sorted(pq.read_table(out / "catalog.parquet")["image_id"].to_pylist())
    for seed, relpath in enumerate(garbage_city["images"]):  # the images arrive before the build
        (garbage_city["root"] / relpath).write_bytes(jpeg_bytes(seed))

    assert _run(garbage_city, out) == 0
    assert "INFO placeforge.shards.outdir: continuing the plan" in capsys.readouterr().err
    manifest = read_manifest(out)
    assert manifest.fingerprint == plan.fingerprint
    assert manifest.counts["in_shards"] == plan.counts["planned"] == GOOD
    assert manifest.counts["rejected_by_reason"] == plan.counts["rejected_by_reason"]
    assert sorted(pq.read_table(out / "catalog.parquet")["image_id"].to_pylist()) == planned
    assert not (out / PLAN_RECORD_FILE).exists() and not (out / WORK_SUBDIR).exists()
