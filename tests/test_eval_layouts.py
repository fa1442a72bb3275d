"""Test sets in the layouts their tools write, placed as the reference evaluator places them.

Every benchmark of evaluation/benchmarks.py gets a tiny copy written here in its exact layout:
the folders and "@" names gmberton/VPR-datasets-downloader writes (numbers formatted as its
util.format_coord does; Nordland, AmsterTime and SPED with its mock coordinates), SF-XL's
processed/test folders.  Each is read with `read_benchmark`, and its positives are compared
with answers known by construction and with an independent re-implementation of
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

from evaluation.benchmarks import BENCHMARKS, read_benchmark
from evaluation.positions import PLANAR_ZONE, coordinate_frame, positions_from_fields
from evaluation.recall import positives_within
from evaluation.testset import check_comparable, read_split
from models.checkpoint import save_model_checkpoint
from models.encoders import EncoderConfig, build_model
from pipelines.evaluate import main
from placeforge.geo import latlon_to_utm, utm_to_latlon
from placeforge.ingest import SourceError, parse_at_names, read_source
from tests.conftest import jpeg_bytes
from tests.test_eval_core import plain_recall

RADIUS_M = 25.0


# --- names as the downloader writes them ---------------------------------------------------

def coord(value: float, left: int, right: int) -> str:
    """The downloader's number format: `left` integer digits (sign included), zero-padded."""
    return f"{float(value):0={left + right + 1}.{right}f}"


def downloader_name(lat: float, lon: float, pano_id: str = "", tile_num: int | None = None,
                    heading: float | None = None, pitch: float | None = None, timestamp: str = "",
                    note: str = "") -> str:
    """The 14-field name the downloader writes for a real position: UTM from full-precision
    lat/lon with 2 decimals, lat/lon with 5."""
    utm = latlon_to_utm(np.array([lat]), np.array([lon]))
    east, north, zone, letter = utm.east_m[0], utm.north_m[0], int(utm.zone_number[0]), str(utm.zone_letter[0])
    tile = "" if tile_num is None else f"{tile_num:02d}"
    head = "" if heading is None else f"{int(heading):03d}"
    tilt = "" if pitch is None else f"{int(pitch):03d}"
    return (f"@{coord(east, 7, 2)}@{coord(north, 7, 2)}@{zone:02d}@{letter}@{coord(lat, 3, 5)}@{coord(lon, 4, 5)}"
            f"@{pano_id}@{tile}@{head}@{tilt}@@@{timestamp}@{note}@.jpg")


def nordland_name(frame: int) -> str:
    """download_nordland.py: frames on a line, 25 / 10.5 m apart (10 frames within 25 m)."""
    return f"@0@{coord(frame * 25 / 10.5, 5, 1)}@@@@@{frame}@@@@@@@@.jpg"


def pair_name(pair: str) -> str:
    """download_amstertime.py and download_sped.py: a pair shares a name; pairs 1 km apart."""
    return f"@0@{int(pair) * 1000}@@@@@{pair}@@@@@@@@.jpg"


def latlon_at(east: float, north: float, zone: int, northern: bool) -> tuple[float, float]:
    lat, lon, ok = utm_to_latlon(np.array([east]), np.array([north]), np.array([zone]), np.array([northern]))
    assert ok[0]
    return float(lat[0]), float(lon[0])


def write_images(folder: Path, names: list[str], first_seed: int) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    images = [jpeg_bytes(first_seed + i, (64, 48)) for i in range(len(names))]
    for name, data in zip(names, images):
        (folder / name).write_bytes(data)
    return images


# --- one tiny copy per benchmark ---------------------------------------------------------------
# A street: database images along the easting, queries beside them.  With these offsets the
# query at 5 m has database images 0 and 1 (5 and 15 m away; 35 m is out), the one at 50 m
# images 2 and 3, and the one at 130 m none; no distance is near 25 m.
DB_OFFSETS_M = (0.0, 20.0, 40.0, 60.0, 200.0)
Q_OFFSETS_M = (5.0, 50.0, 130.0)
STREET_POSITIVES = [[0, 1], [2, 3], []]

# benchmark: (UTM zone, northern, origin east, north; fields the downloader's script fills)
UTM_SETS = {
    "pitts30k": (17, True, (584_100.0, 4_477_200.0), {"pano_id": "000123", "tile_num": 13, "note": "pitch1_yaw2"}),
    "pitts250k": (17, True, (585_300.0, 4_476_400.0), {"pano_id": "004567", "tile_num": 2, "note": "pitch1_yaw3"}),
    "tokyo247": (54, True, (386_500.0, 3_950_100.0), {"pano_id": "00123456"}),
    "san-francisco": (10, True, (551_000.0, 4_180_000.0), {"pano_id": "pci8y", "tile_num": 3, "heading": 270,
                                                          "pitch": 4}),
    "st-lucia": (56, False, (502_000.0, 6_960_000.0), {"pano_id": "100909_0845_00012"}),
    "eynsham": (30, True, (607_000.0, 5_740_000.0), {"pano_id": "0042", "tile_num": 4,
                                                    "timestamp": "20080416_121314"}),
}
SVOX_QUERIES = ("queries", "queries_night", "queries_overcast", "queries_rain", "queries_snow", "queries_sun")
SF_XL_QUERIES = ("queries_v1", "queries_v2", "queries_night", "queries_occlusion")


def street(folder: Path, zone: int, northern: bool, origin: tuple[float, float], offsets: tuple[float, ...],
           first_seed: int, **fields) -> list[bytes]:
    names = [downloader_name(*latlon_at(origin[0] + d, origin[1], zone, northern), **fields) for d in offsets]
    return write_images(folder, names, first_seed)


def write_benchmark(name: str, tmp_path: Path) -> tuple[Path, list[list[int]]]:
    """Write benchmark `name` below tmp_path in its layout; (root, positives known by construction)."""
    if name in UTM_SETS:
        zone, northern, origin, fields = UTM_SETS[name]
        root = tmp_path / "datasets" / name.replace("-", "_")
        street(root / "images/test/database", zone, northern, origin, DB_OFFSETS_M, 0, **fields)
        street(root / "images/test/queries", zone, northern, origin, Q_OFFSETS_M, 100, **fields)
        return root, STREET_POSITIVES
    if name == "msls-val":  # two cities in two zones: Copenhagen (33U) and San Francisco (10S)
        root = tmp_path / "msls"
        cities = (("cph", 33, (347_000.0, 6_172_000.0), 0), ("sf", 10, (551_000.0, 4_180_000.0), 50))
        for city, zone, origin, seed in cities:
            for side, offsets in (("database", DB_OFFSETS_M), ("queries", Q_OFFSETS_M[:2])):
                street(root / "val" / side, zone, True, origin, offsets, seed + (20 if side == "queries" else 0),
                       pano_id=f"{city}key{side[0]}", timestamp="20160915", note=f"day_backward_{city}")
        # sorted names: cph's eastings (0347...) come before sf's (0551...)
        return root, [[0, 1], [2, 3], [5, 6], [7, 8]]
    if name == "nordland":
        root = tmp_path / "datasets" / "nordland"
        frames = range(14)
        write_images(root / "images/test/database", [nordland_name(f) for f in frames], 0)
        write_images(root / "images/test/queries", [nordland_name(f) for f in frames], 100)
        return root, [[d for d in frames if abs(d - q) <= 10] for q in frames]
    if name in ("amstertime", "sped"):
        root = tmp_path / "datasets" / name
        pairs = [f"{i:04d}" for i in range(13)] if name == "amstertime" else [f"{i:07d}" for i in (1, 2, 3, 11, 12)]
        names = sorted(pair_name(p) for p in pairs)  # 0, 1000, 10000, 11000, ...: not numeric order
        write_images(root / "images/test/database", names, 0)
        write_images(root / "images/test/queries", names, 100)
        return root, [[i] for i in range(len(names))]  # each query's twin, and nothing else
    if name.startswith("svox"):  # Oxford (30U); every query folder beside one gallery
        root = tmp_path / "datasets" / "svox"
        origin = (620_000.0, 5_735_000.0)
        street(root / "images/test/gallery", 30, True, origin, DB_OFFSETS_M, 0)
        for i, folder in enumerate(SVOX_QUERIES):
            street(root / "images/test" / folder, 30, True, origin, Q_OFFSETS_M[: 1 + i % 3], 100 + 10 * i)
        count = 1 + SVOX_QUERIES.index(BENCHMARKS[name].queries.rsplit("/", 1)[-1]) % 3
        return root, STREET_POSITIVES[:count]
    if name.startswith("sf-xl"):  # processed/test: one database, four query sets
        root = tmp_path / "sf_xl" / "processed"
        origin = (549_000.0, 4_181_000.0)
        street(root / "test/database", 10, True, origin, DB_OFFSETS_M, 0, pano_id="pano", tile_num=1, heading=90)
        for i, folder in enumerate(SF_XL_QUERIES):
            street(root / "test" / folder, 10, True, origin, Q_OFFSETS_M[: 1 + i % 3], 100 + 10 * i)
        count = 1 + SF_XL_QUERIES.index(BENCHMARKS[name].queries.rsplit("/", 1)[-1]) % 3
        return root, STREET_POSITIVES[:count]
    raise AssertionError(f"no fixture for benchmark {name}")


def reference_positives(db_paths: list[str], q_paths: list[str]) -> list[list[int]]:
    """VPR-methods-evaluation's ground truth, re-implemented: fields 1, 2 of the name as
    float east/north, every database image within 25 m (sklearn radius neighbours)."""
    def east_north(paths: list[str]) -> np.ndarray:
        return np.array([Path(p).name.split("@")[1:3] for p in paths]).astype(float)

    knn = NearestNeighbors().fit(east_north(db_paths))
    found = knn.radius_neighbors(east_north(q_paths), radius=RADIUS_M, return_distance=False)
    return [sorted(int(i) for i in hits) for hits in found]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_layout_is_read_with_the_positives_it_was_built_with(name, tmp_path):
    root, expected = write_benchmark(name, tmp_path)
    database, queries = read_benchmark(f"{name}:{root}")
    bench = BENCHMARKS[name]
    assert database.paths[0].startswith(str((root / bench.database).resolve()) + "/")
    assert queries.paths[0].startswith(str((root / bench.queries).resolve()) + "/")
    assert database.frame == queries.frame == bench.frame and database.rejected == queries.rejected == 0
    assert (database.zone == PLANAR_ZONE).all() == (bench.frame == "planar")
    positives = positives_within(database.east_north, database.zone, queries.east_north, queries.zone, RADIUS_M)
    ours = [p.tolist() for p in positives]
    assert ours == expected
    assert ours == reference_positives(database.paths, queries.paths)


def test_positions_are_the_name_utm_fields_not_its_lat_lon(tmp_path):
    # lat/lon put the database image 40 m east of where its UTM fields put it: the fields win.
    east, north = 551_000.0, 4_180_000.0
    lat, lon = latlon_at(east + 40.0, north, 10, True)
    moved = f"@{coord(east, 7, 2)}@{coord(north, 7, 2)}@10@S@{coord(lat, 3, 5)}@{coord(lon, 4, 5)}@p@@@@@@@@.jpg"
    write_images(tmp_path / "database", [moved], 0)
    query = downloader_name(*latlon_at(east + 3.0, north, 10, True))
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
    write_images(mixed, [nordland_name(1), downloader_name(37.7751, -122.5113)], 0)
    with pytest.raises(SourceError, match=r"mock coordinates .* cannot be compared with real positions"):
        read_split(str(mixed))

    write_images(tmp_path / "planar", [nordland_name(1)], 0)
    write_images(tmp_path / "utm", [downloader_name(37.7751, -122.5113)], 1)
    database, queries = read_split(str(tmp_path / "planar")), read_split(str(tmp_path / "utm"), "queries")
    with pytest.raises(SourceError, match=r"the database have mock coordinates \(e\.g\. @0@00002\.4@"):
        check_comparable(database, queries)


def test_evaluate_refuses_a_mix_and_a_wrong_layout_with_one_error_line(tmp_path, capsys):
    write_images(tmp_path / "planar", [nordland_name(1)], 0)
    write_images(tmp_path / "utm", [downloader_name(37.7751, -122.5113)], 1)
    code = main(["--checkpoint", str(tmp_path / "m.pt"), "--database", f"atname:{tmp_path / 'planar'}",
                 "--queries", f"atname:{tmp_path / 'utm'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("evaluate: error: the database have mock coordinates")

    root, _ = write_benchmark("tokyo247", tmp_path)  # UTM names where nordland has mock coordinates
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
    root, _ = write_benchmark("nordland", tmp_path)
    result = read_source("atname", root / "images/test/database")
    assert result.catalog.num_rows == 0 and set(result.rejects.column("reason").to_pylist()) == {"bad_coordinates"}


def test_bad_names_in_a_benchmark_are_set_aside_with_a_reason(tmp_path):
    root, expected = write_benchmark("nordland", tmp_path)
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
    root, expected = write_benchmark(name, tmp_path)
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
