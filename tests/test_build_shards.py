"""build_shards.py on a real local Ray: accounting, read-back with plain webdataset, re-runs, resume."""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from placeforge.config import from_mapping
from placeforge.fileio import LOCK_FILE, file_sha256, output_lock
from placeforge.pipelines.build_shards import main
from placeforge.places import PlaceConfig
from placeforge.shards.build import BuildConfig, _fingerprint, build, build_one_shard, fingerprint_settings
from placeforge.shards.layout import WORK_SUBDIR
from placeforge.shards.manifest import read_manifest
from placeforge.shards.outdir import claim_out_dir
from placeforge.shards.plan import plan_shards
from tests.conftest import jpeg_bytes

pytestmark = pytest.mark.ray

ARGS = ["--min-shards", "2", "--images-per-shard", "8", "--short-side", "48"]


def run(root, out, *extra):
    return main(["--source", f"atname:{root}", "--out", str(out), *ARGS, *extra])


def read_all(out):
    manifest = read_manifest(out)
    samples = []
    for record in manifest.shards:
        path = out / "shards" / record.name
        assert file_sha256(path) == record.sha256 and path.stat().st_size == record.bytes
        samples += list(wds.WebDataset(str(path), shardshuffle=False))
    return manifest, samples


def test_every_input_is_in_the_shards_or_rejected(local_ray, at_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(at_dataset["root"], out) == 0
    printed = capsys.readouterr().out
    assert f"inputs {at_dataset['inputs']} = in shards {at_dataset['good']} + rejected" in printed

    manifest, samples = read_all(out)
    catalog = pq.read_table(out / "catalog.parquet")
    rejects = pq.read_table(out / "rejects.parquet")
    index = pq.read_table(out / "index.parquet")
    assert manifest.counts["inputs"] == catalog.num_rows + rejects.num_rows == at_dataset["inputs"]
    assert manifest.counts["rejected_by_reason"] == at_dataset["reasons"]

    in_tars = []
    for sample in samples:
        record = json.loads(sample["json"])
        assert len({m["image_id"] for m in record["images"]}) == len(record["images"])
        for meta in record["images"]:
            assert meta["member"] in sample and min(meta["width"], meta["height"]) == 48
            in_tars.append(meta["image_id"])
    assert sorted(in_tars) == sorted(catalog.column("image_id").to_pylist()) == sorted(index.column("image_id").to_pylist())
    assert manifest.counts["places"] == 3 and len(samples) == 3  # one sample per place (<= 16 images)
    places = {json.loads(s["json"])["place_id"] for s in samples}
    assert places == set(catalog.column("place_id").to_pylist())
    with tarfile.open(out / "shards" / manifest.shards[0].name) as tar:  # plain tar reads it too
        assert all(m.isfile() and not m.name.startswith(("/", "..")) for m in tar.getmembers())
    assert not (out / WORK_SUBDIR).exists()


def test_rerun_is_a_no_op_and_a_changed_config_refuses(local_ray, at_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(at_dataset["root"], out) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert run(at_dataset["root"], out) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    assert run(at_dataset["root"], out, "--seed", "5") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(at_dataset["root"], out, "--seed", "5", "--overwrite") == 0
    assert read_manifest(out).config["seed"] == 5


def test_interrupted_build_resumes_and_matches_a_clean_build(local_ray, at_dataset, tmp_path):
    cfg = BuildConfig(min_shards=3, images_per_shard=6, short_side=48)
    clean = build([("atname", at_dataset["root"])], tmp_path / "clean", cfg)

    # Reproduce the state a killed build leaves: plan written, one shard finished, one
    # shard's temporary file half-written, no manifest.
    out = tmp_path / "resumed"
    from placeforge.fileio import write_parquet_atomic
    from placeforge.places import assign_places
    from placeforge.shards.build import _ingest

    catalog, _, _ = _ingest([("atname", at_dataset["root"])])
    kept, _ = assign_places(catalog, cfg.places)
    plan = plan_shards(kept, cfg.max_images_per_sample, cfg.images_per_shard, cfg.min_shards, cfg.seed)
    fingerprint = _fingerprint(cfg, [("atname", at_dataset["root"])], plan)
    assert not claim_out_dir(out.resolve(), fingerprint, overwrite=False)
    write_parquet_atomic(plan, out / WORK_SUBDIR / "plan.parquet")
    (out / WORK_SUBDIR / "fingerprint").write_text(fingerprint)
    build_one_shard({"shard_index": 1}, str(out.resolve()), cfg.short_side, cfg.jpeg_quality)
    (out / "shards" / ".shard-000000.tar.tmp-1234").write_bytes(b"partial")

    resumed = build([("atname", at_dataset["root"])], out, cfg)
    assert resumed.resumed_shards == 1
    assert [s.sha256 for s in resumed.manifest.shards] == [s.sha256 for s in clean.manifest.shards]
    assert resumed.manifest.counts == clean.manifest.counts
    assert sorted(p.name for p in (out / "shards").iterdir()) == [s.name for s in clean.manifest.shards]


def test_two_sources_with_the_same_folder_reject_the_second_copy(local_ray, at_dataset, tmp_path):
    out = tmp_path / "out"
    root = at_dataset["root"]
    assert main(["--source", f"atname:{root}", "--source", f"atname:{root}", "--out", str(out), *ARGS]) == 0
    counts = read_manifest(out).counts
    assert counts["inputs"] == 2 * at_dataset["inputs"]
    assert counts["in_shards"] == at_dataset["good"]


@pytest.mark.parametrize(
    "source,message",
    [("nosuch:/tmp", "nosuch"), ("atname", "FORMAT:PATH"), ("atname:/definitely/missing", "/definitely/missing")],
)
def test_bad_sources_fail_at_once_with_a_message(source, message, tmp_path, capsys):
    assert main(["--source", source, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_dir_with_foreign_files_is_refused(at_dataset, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "my_thesis.tex").write_text("precious")
    assert run(at_dataset["root"], out) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "my_thesis.tex").read_text() == "precious"


def write_gsv(root, seed0):
    """2 places x 4 images in one city, plus a CSV row whose file is missing."""
    (root / "Dataframes").mkdir(parents=True)
    (root / "Images" / "Lyon").mkdir(parents=True)
    lines = ["place_id,year,month,northdeg,city_id,lat,lon,panoid"]
    for place in range(2):
        for i in range(4):
            lat, lon = f"45.76{place}{i}", f"4.83{place}{i}"
            lines.append(f"{place},2019,{i + 1},{i * 90},Lyon,{lat},{lon},pano{place}x{i}")
            name = f"Lyon_{place:07d}_2019_{i + 1:02d}_{i * 90:03d}_{lat}_{lon}_pano{place}x{i}.jpg"
            (root / "Images" / "Lyon" / name).write_bytes(jpeg_bytes(seed0 + place * 10 + i))
    lines.append("5,2019,1,0,Lyon,45.7,4.8,gone")
    (root / "Dataframes" / "Lyon.csv").write_text("\n".join(lines) + "\n")
    return 8, 9


def write_msls(root, seed0):
    """One city, 5 database images a metre apart (one place), plus an image with no row."""
    side = root / "train_val" / "tokyo" / "database"
    (side / "images").mkdir(parents=True)
    rows = [",key,lon,lat,ca,captured_at,pano"]
    for i in range(5):
        rows.append(f"{i},k{i},139.70000{i},35.690000,{i * 10},{1500000000000 + i},False")
        (side / "images" / f"k{i}.jpg").write_bytes(jpeg_bytes(seed0 + i))
    (side / "raw.csv").write_text("\n".join(rows) + "\n")
    (side / "images" / "orphan.jpg").write_bytes(jpeg_bytes(seed0 + 9))
    return 5, 6


def write_gldv2(root, seed0):
    """One landmark with 4 images, plus an id that would escape the root."""
    ids = [f"{i:x}" * 16 for i in range(10, 14)]
    for n, image_id in enumerate(ids):
        path = root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(seed0 + n))
    (root / "train_clean.csv").write_text("landmark_id,images\n" f"42,{' '.join(ids)} ../../etc/passwd\n")
    return 4, 5


def test_every_format_round_trips_through_the_shards(local_ray, tmp_path):
    writers = {"gsv_cities": write_gsv, "msls": write_msls, "gldv2": write_gldv2}
    sources, expected_good, expected_inputs = [], {}, 0
    for n, (fmt, writer) in enumerate(writers.items()):
        root = tmp_path / fmt
        good, inputs = writer(root, 1000 * (n + 1))
        sources += ["--source", f"{fmt}:{root}"]
        expected_good[fmt] = good
        expected_inputs += inputs
    out = tmp_path / "out"
    assert main([*sources, "--out", str(out), *ARGS]) == 0
    manifest, samples = read_all(out)
    catalog = pq.read_table(out / "catalog.parquet")
    assert manifest.counts["inputs"] == expected_inputs
    assert Counter(catalog.column("source").to_pylist()) == expected_good
    assert sorted(i for s in samples for i in (m["image_id"] for m in json.loads(s["json"])["images"])) == sorted(
        catalog.column("image_id").to_pylist()
    )
    keys = {json.loads(s["json"])["place_key"] for s in samples}
    assert any(k.startswith("gsv_cities:gsv_cities:Lyon/") for k in keys)
    assert "gldv2:gldv2:42" in keys and any(k.startswith("utm:54N:") for k in keys)  # Tokyo is zone 54


def _keep(sample):
    return sample


def test_reader_splits_real_shards_by_rank_and_loader_worker(local_ray, at_dataset, tmp_path):
    from torch.utils.data import DataLoader

    from placeforge.shards.reader import ShardSet, place_sample_pipeline

    out = tmp_path / "out"
    assert main(["--source", f"atname:{at_dataset['root']}", "--out", str(out), "--min-shards", "3",
                 "--images-per-shard", "4", "--short-side", "48"]) == 0  # fmt: skip
    urls = ShardSet.open(out).urls
    everything = {s["__key__"] for u in urls for s in wds.WebDataset(u, shardshuffle=False)}
    assert len(urls) == 3 and len(everything) == 3

    seen = []
    for rank in range(2):
        pipeline = place_sample_pipeline(urls, rank=rank, world_size=2, epoch=1, shuffle_buffer=4)
        loader = DataLoader(pipeline, batch_size=None, num_workers=2, collate_fn=_keep)
        seen.append([s.key for s in loader])
    assert sorted(seen[0] + seen[1]) == sorted(everything)  # each sample once, across ranks and workers
    assert not set(seen[0]) & set(seen[1])


def test_overwrite_refuses_build_names_that_no_build_recorded(at_dataset, tmp_path, capsys):
    """--overwrite into shared storage: a shards/ or _work/ folder without a manifest is someone else's."""
    out = tmp_path / "shared"
    (out / "shards" / "sfxl").mkdir(parents=True)
    (out / "shards" / "sfxl" / "shard-000000.tar").write_bytes(b"another team's shards")
    (out / "_work").mkdir()
    (out / "_work" / "notes.txt").write_text("mine")
    (out / "catalog.parquet").write_bytes(b"not ours")
    assert run(at_dataset["root"], out, "--overwrite") == 2
    assert "nothing was removed" in capsys.readouterr().err
    assert (out / "shards" / "sfxl" / "shard-000000.tar").read_bytes() == b"another team's shards"
    assert (out / "_work" / "notes.txt").read_text() == "mine"
    assert (out / "catalog.parquet").read_bytes() == b"not ours"


def test_overwrite_removes_only_the_files_the_manifest_lists(local_ray, at_dataset, tmp_path):
    out = tmp_path / "o"
    assert run(at_dataset["root"], out) == 0
    (out / "shards" / "README.txt").write_text("mine")
    (out / "notes.txt").write_text("mine")
    assert run(at_dataset["root"], out, "--seed", "5", "--overwrite", "--min-shards", "3") == 0
    assert (out / "shards" / "README.txt").read_text() == "mine" and (out / "notes.txt").read_text() == "mine"
    manifest, _ = read_all(out)
    assert manifest.config["seed"] == 5 and len(manifest.shards) >= 3
    assert {p.name for p in (out / "shards").iterdir()} == {r.name for r in manifest.shards} | {"README.txt"}
    assert not (out / "_work").exists()


def test_a_second_build_into_the_same_out_is_refused_and_names_the_holder(at_dataset, tmp_path, capsys):
    out = tmp_path / "o"
    with output_lock(out, "build_shards"):
        assert run(at_dataset["root"], out) == 2
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    err = capsys.readouterr().err
    assert "is being written by build_shards (host" in err and f"pid {os.getpid()}" in err
    assert not out.exists()  # the holder wrote nothing either: no trace left


def test_a_shard_set_built_before_the_places_section_keeps_its_fingerprint():
    cfg = BuildConfig(places=PlaceConfig(cell_size_m=10.0, heading_sectors=4), seed=3)
    before = {"cell_size_m": 10.0, "heading_sectors": 4, "min_images_per_place": 4, "view_radius_m": 0.0,
              "max_images_per_sample": 16, "images_per_shard": 2000, "min_shards": 16, "short_side": 320,
              "jpeg_quality": 90, "seed": 3}  # to_dict(cfg) when the place keys were flat
    assert fingerprint_settings(cfg) == before
    assert from_mapping(BuildConfig, before, old_keys="quiet") == cfg  # and such a record reads back
