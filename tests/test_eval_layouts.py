"""Test sets in the layouts their tools write, placed as the reference evaluator places them.

Every benchmark of evaluation/benchmarks.py gets a tiny copy in its exact layout, written by
tests/benchmark_layouts.py (which names the script and lines each copy follows): the folders
and "@" names gmberton/VPR-datasets-downloader writes (numbers formatted as its
util.format_coord does; Nordland, AmsterTime and SPED with its mock coordinates), SF-XL's
processed/test folders.  Each is read with `read_benchmark`: its counts and positives are
compared with answers known by construction and with an independent re-implementation of
VPR-methods-evaluation's ground truth (fields 1 and 2 of the name, sklearn radius neighbours).
The last tests run pipelines/evaluate.py end to end on two of them (marked ray).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from placeforge.evaluation.benchmarks import BENCHMARKS, read_benchmark
from placeforge.evaluation.positions import PLANAR_ZONE, coordinate_frame, positions_from_fields
from placeforge.evaluation.recall import positives_within
from placeforge.evaluation.testset import check_comparable, read_split
from placeforge.geo import latlon_to_utm
from placeforge.ingest import SourceError, parse_at_names, read_source
from placeforge.models.checkpoint import save_model_checkpoint
from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.pipelines.evaluate import main
from tests.benchmark_layouts import (
    SF_XL_NIGHT_LATLON_OFFSET_M,
    coord,
    dst_name,
    latlon_at,
    nordland_name,
    pair_name,
    pitts_name,
    sf_xl_name,
    tokyo_query_name,
    write_benchmark,
    write_images,
)
from tests.test_eval_core import plain_recall

RADIUS_M = 25.0


def reference_positives(db_paths: list[str], q_paths: list[str]) -> list[list[int]]:
    """VPR-methods-evaluation's ground truth, re-implemented: fields 1, 2 of the name as
    float east/north, every database image within 25 m (sklearn radius neighbours)."""
    def east_north(paths: list[str]) -> np.ndarray:
        return np.array([Path(p).name.split("@")[1:3] for p in paths]).astype(float)

    knn = NearestNeighbors().fit(east_north(db_paths))
    found = knn.radius_neighbors(east_north(q_paths), radius=RADIUS_M, return_distance=False)
    return [sorted(int(i) for i in hits) for hits in found]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_layout_is_read_with_the_counts_and_positives_it_was_built_with(name, tmp_path):
    written = write_benchmark(name, tmp_path)
    root, expected = written.root, written.positives
    database, queries = read_benchmark(f"{name}:{root}")
    bench = BENCHMARKS[name]
    assert (len(database), len(queries)) == (written.database_count, len(expected))
    assert database.paths[0].startswith(str((root / bench.database).resolve()) + "/")
    assert queries.paths[0].startswith(str((root / bench.queries).resolve()) + "/")
    assert database.frame == queries.frame == bench.frame and database.rejected == queries.rejected == 0
    assert (database.zone == PLANAR_ZONE).all() == (bench.frame == "planar")
    positives = positives_within(database.east_north, database.zone, queries.east_north, queries.zone, RADIUS_M)
    ours = [p.tolist() for p in positives]
    assert ours == expected
    assert ours == reference_positives(database.paths, queries.paths)


def test_fixture_names_have_the_fields_the_tools_write():
    # Real names, compared from field 3 (zone) on; fields 1 and 2 are recomputed from the printed
    # lat/lon here, so they may differ by the metre its 5 decimals drop.  Pitts30k, Tokyo 24/7 and
    # the SF-XL night name as code that reads the formatted sets quotes them; SF-XL v1 and its
    # database from OliverGrainge/TeTRA-VPR's dataloaders/val/image_paths/sf_xl_small_*.npy.
    real = {
        pitts_name(40.43857, -80.00562, "queries_real/004/004561_pitch1_yaw1.jpg"):
            "@0584334.39@4476910.88@17@T@040.43857@-080.00562@004561@00@@@@@@pitch1_yaw1@.jpg",
        tokyo_query_name(35.65375, 139.69540, "00399.jpg"):
            "@0381904.46@3946329.36@54@S@035.65375@0139.69540@00399.jpg@@@@@@@@.jpg",
        sf_xl_name(37.76031, -122.50882, "51321055860", None, "20210718"):
            "@0543263.69@4179336.01@10@S@037.76031@-122.50882@51321055860@@@@@@20210718@@.jpg",
        sf_xl_name(37.77087, -122.51113, "91v00dfETJ4DjDI7udN8xg", 150, "201904"):
            "@0543054.81@4180505.57@10@S@037.77087@-122.51113@91v00dfETJ4DjDI7udN8xg@@150@@@@201904@@.jpg",
    }
    for ours, theirs in real.items():
        assert ours.split("@")[3:] == theirs.split("@")[3:], ours
        east_north = [[float(f) for f in name.split("@")[1:3]] for name in (ours, theirs)]
        assert np.allclose(*east_north, atol=1.5), ours
    night = "@0543030.55@4180984.98@10@S@37.775128@-122.51158@31760538811@@@@@@20161226@@.jpg"
    assert sf_xl_name(37.775128, -122.51158, "31760538811", None, "20161226", plain_latlon=True,
                      east_north=(543030.55, 4180984.98)) == night
    utm = latlon_to_utm(np.array([37.775128]), np.array([-122.51158]))  # its lat/lon: 19 m from its UTM fields
    offset = (utm.east_m[0] - 543030.55, utm.north_m[0] - 4180984.98)
    assert np.allclose(offset, SF_XL_NIGHT_LATLON_OFFSET_M, atol=0.01)
    # The mock names, from the scripts' own formulas (benchmark_layouts cites the lines).
    assert [nordland_name(f) for f in (0, 10, 11)] == ["@0@00000.0@@@@@0@@@@@@@@.jpg", "@0@00023.8@@@@@10@@@@@@@@.jpg",
                                                       "@0@00026.2@@@@@11@@@@@@@@.jpg"]
    assert pair_name("0000606") == "@0@606000@@@@@0000606@@@@@@@@.jpg" and pair_name("0012").startswith("@0@12000@")


def test_positions_are_the_name_utm_fields_not_its_lat_lon(tmp_path):
    # lat/lon put the database image 40 m east of where its UTM fields put it: the fields win.
    east, north = 551_000.0, 4_180_000.0
    lat, lon = latlon_at(east + 40.0, north, 10, True)
    moved = f"@{coord(east, 7, 2)}@{coord(north, 7, 2)}@10@S@{coord(lat, 3, 5)}@{coord(lon, 4, 5)}@p@@@@@@@@.jpg"
    write_images(tmp_path / "database", [moved], 0)
    query = dst_name(*latlon_at(east + 3.0, north, 10, True), "p")
    write_images(tmp_path / "queries", [query], 1)
    database, queries = read_split(str(tmp_path / "database")), read_split(str(tmp_path / "queries"), "queries")
    assert database.east_north.tolist() == [[east, north]] and database.zone.tolist() == [10]
    assert queries.east_north[0].tolist() == [float(query.split("@")[1]), float(query.split("@")[2])]
    assert positives_within(database.east_north, database.zone, queries.east_north, queries.zone,
                            RADIUS_M)[0].tolist() == [0]


def test_position_rules_name_by_name():
    names = {
        "utm": "@0543037.38@4180974.80@10@S@037.77510@-122.51130@pano@@134@@@@201311@@.jpg",
        "south": "@0502000.00@6960000.00@56@J@-27.50000@0153.00000@p@@@@@@@@.jpg",
        "lower_letter": "@0502000.00@6960000.00@56@j@@@p@@@@@@@@.jpg",
        "latlon_only": "@@@@@037.77510@-122.51130@p@@@@@@@@.jpg",
        "nan_utm_latlon": "@nan@nan@10@S@037.77510@-122.51130@p@@@@@@@@.jpg",
        "mock_nordland": "@0@00023.8@@@@@10@@@@@@@@.jpg",
        "mock_pair": "@0@12000@@@@@0012@@@@@@@@.jpg",
        "utm_no_zone": "@0543037.38@4180974.80@@@037.77510@-122.51130@p@@@@@@@@.jpg",
        "zone_no_letter": "@1@2@10@@@@@@@@@@@@.jpg",
        "zone_61": "@0543037.38@4180974.80@61@S@@@p@@@@@@@@.jpg",
        "letter_i": "@0543037.38@4180974.80@10@I@@@p@@@@@@@@.jpg",
        "east_only": "@5@@@@@@p@@@@@@@@.jpg",
        "mock_bad_latlon": "@0@5@@@95.0@0@p@@@@@@@@.jpg",
        "nothing": "@" * 15 + ".jpg",
    }
    fields = parse_at_names(pl.Series(list(names.values())))
    assert fields["ok"].all()
    found = positions_from_fields(fields)
    got = {key: (found.east_north[i].tolist(), int(found.zone[i]), found.reason[i])
           for i, key in enumerate(names) if found.usable[i]}
    assert got["utm"] == ([543037.38, 4180974.80], 10, None)
    assert got["south"] == ([502000.0, 6960000.0], -56, None) and got["lower_letter"][1] == -56
    utm = latlon_to_utm(np.array([37.7751]), np.array([-122.5113]))
    assert got["latlon_only"] == ([utm.east_m[0], utm.north_m[0]], 10, None)
    assert got["nan_utm_latlon"] == got["latlon_only"]
    assert got["mock_nordland"] == ([0.0, 23.8], PLANAR_ZONE, None) and got["mock_pair"] == ([0.0, 12000.0], 0, None)
    assert got["utm_no_zone"] == ([543037.38, 4180974.80], 10, None)  # the zone of its lat/lon
    assert found.from_latlon.tolist() == [key in ("latlon_only", "nan_utm_latlon") for key in names]
    problems = {key: (found.reason[i], found.detail[i]) for i, key in enumerate(names) if not found.usable[i]}
    assert sorted(problems) == ["east_only", "letter_i", "mock_bad_latlon", "nothing", "zone_61", "zone_no_letter"]
    assert problems["nothing"][0] == "no_coordinates"
    assert all(reason == "bad_coordinates" for key, (reason, _) in problems.items() if key != "nothing")
    assert "give both, or neither" in problems["zone_no_letter"][1]
    assert "not 1..60" in problems["zone_61"][1] and "latitude band" in problems["letter_i"][1]
    assert "lat 95.0 is outside" in problems["mock_bad_latlon"][1]
    assert np.isnan(found.east_north[~found.usable]).all()


def test_mock_coordinates_mixed_with_utm_zones_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"1 image\(s\) with mock coordinates and 2 in UTM zones"):
        coordinate_frame(np.array([10, 0, -56]))
    assert coordinate_frame(np.array([0, 0])) == "planar" and coordinate_frame(np.array([10, -56])) == "utm"

    mixed = tmp_path / "mixed"
    write_images(mixed, [nordland_name(1), dst_name(37.7751, -122.5113, "p")], 0)
    with pytest.raises(SourceError, match=r"mock coordinates .* cannot be compared with real positions"):
        read_split(str(mixed))

    write_images(tmp_path / "planar", [nordland_name(1)], 0)
    write_images(tmp_path / "utm", [dst_name(37.7751, -122.5113, "p")], 1)
    database, queries = read_split(str(tmp_path / "planar")), read_split(str(tmp_path / "utm"), "queries")
    with pytest.raises(SourceError, match=r"the database have mock coordinates \(e\.g\. @0@00002\.4@"):
        check_comparable(database, queries)


def test_evaluate_refuses_a_mix_and_a_wrong_layout_with_one_error_line(tmp_path, capsys):
    write_images(tmp_path / "planar", [nordland_name(1)], 0)
    write_images(tmp_path / "utm", [dst_name(37.7751, -122.5113, "p")], 1)
    code = main(["--checkpoint", str(tmp_path / "m.pt"), "--database", f"atname:{tmp_path / 'planar'}",
                 "--queries", f"atname:{tmp_path / 'utm'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("evaluate: error: the database have mock coordinates")

    root = write_benchmark("tokyo247", tmp_path).root  # UTM names where nordland has mock coordinates
    for spec, message in ((f"nordland:{root}", ("nordland: the database names carry UTM positions, but nordland's "
                                                 "carry mock coordinates")),
                          (f"svox:{root}", f"svox expects {root}/images/test/gallery"),
                          (f"tokio:{root}", "unknown benchmark 'tokio'; valid: pitts30k, pitts250k, tokyo247"),
                          ("nordland", "benchmark 'nordland' has no root; expected NAME:ROOT")):
        code = main(["--checkpoint", str(tmp_path / "m.pt"), "--benchmark", spec, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("evaluate: error: ") and message in err, err
    assert not (tmp_path / "out").exists()

    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", "m.pt", "--benchmark", f"nordland:{root}", "--test-set", str(root), "--out", "o"])
    assert stop.value.code == 2 and "give one of --test-set, --benchmark" in capsys.readouterr().err


def test_shard_building_still_rejects_mock_coordinates(tmp_path):
    # The catalog needs real lat/lon; only evaluation reads mock coordinates.
    root = write_benchmark("nordland", tmp_path).root
    result = read_source("atname", root / "images/test/database")
    assert result.catalog.num_rows == 0 and set(result.rejects.column("reason").to_pylist()) == {"bad_coordinates"}


def test_bad_names_in_a_benchmark_are_set_aside_with_a_reason(tmp_path):
    written = write_benchmark("nordland", tmp_path)
    root, expected = written.root, written.positives
    database = root / "images/test/database"
    write_images(database, ["@0@5@10@@@@@@@@@@@@.jpg", "frame_0001.jpg"], 500)
    (database / "notes.txt").write_text("not an image: not an input")
    db, queries = read_benchmark(f"nordland:{root}")
    assert len(db) == 14 and positives_within(db.east_north, db.zone, queries.east_north, queries.zone,
                                              RADIUS_M)[0].tolist() == expected[0]
    rejects = {r["input"]: (r["reason"], r["detail"]) for r in db.rejects.to_pylist()}
    assert sorted(rejects) == ["@0@5@10@@@@@@@@@@@@.jpg", "frame_0001.jpg"]
    assert rejects["frame_0001.jpg"] == ("bad_name", "does not start with '@'")
    assert rejects["@0@5@10@@@@@@@@@@@@.jpg"][0] == "bad_coordinates"


# --- end to end: pipelines/evaluate.py on a real local Ray ----------------------------------------

@pytest.fixture(scope="module")
def global_only_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = EncoderConfig(name="vit_tiny_test", image_size=56, descriptor_dim=32)
    return save_model_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "global_only.pt")


@pytest.mark.ray
@pytest.mark.parametrize("name", ["amstertime", "svox-overcast"])
def test_evaluate_runs_a_benchmark_end_to_end(local_ray, global_only_checkpoint, name, tmp_path, capsys):
    written = write_benchmark(name, tmp_path)
    root, expected = written.root, written.positives
    bench = BENCHMARKS[name]
    if name == "svox-overcast":  # each query is its nearest gallery image (0 and 2); the last has no positive
        gallery = sorted((root / bench.database).iterdir())
        queries = sorted((root / bench.queries).iterdir())
        for query, twin in zip(queries, (0, 2)):
            query.write_bytes(gallery[twin].read_bytes())
        right_at_1 = 2 / 3
    else:  # AmsterTime-like: every query is the very image of its database twin
        for query in (root / bench.queries).iterdir():
            query.write_bytes((root / bench.database / query.name).read_bytes())
        right_at_1 = 1.0
    out = tmp_path / "eval"
    code = main(["--checkpoint", str(global_only_checkpoint), "--benchmark", f"{name}:{root}", "--out", str(out),
                 "--baseline", "false", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["title"] == f"global_only.pt on {name}"
    assert report["positions"] == {"database": bench.frame, "queries": bench.frame}
    database, queries = read_benchmark(f"{name}:{root}")
    assert report["counts"]["database"] == len(database) and report["counts"]["queries"] == len(queries)
    assert report["counts"]["queries_with_positive"] == sum(1 for p in expected if p)
    db = np.load(out / "features" / "database" / "descriptors.npy").astype(np.float32)
    q = np.load(out / "features" / "queries" / "descriptors.npy").astype(np.float32)
    recall = {int(n): r for n, r in report["recall"]["global"].items()}
    assert recall == plain_recall(db, q, database.east_north, queries.east_north, RADIUS_M, (1, 5, 10, 20))
    assert recall[1] == pytest.approx(right_at_1)
