"""The synthetic city: determinism, both file formats, geometry of the splits, idempotent writes.

Real files are written (the tiny preset, ~220 images of 160x120) and read back
the way an ingest would: names parsed, coordinates checked with `utm`, images
decoded with PIL.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import utm
from PIL import Image

from placeforge.config import ConfigError
from synthcity import generate
from synthcity.__main__ import main
from synthcity.naming import GSV_CSV_HEADER, at_name, gsv_name, heading_text, short_id
from synthcity.synth_config import SynthConfig
from synthcity.write import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PARTIAL_NAME,
    OutputDirError,
    manifest_config,
    plan_dataset,
)

TINY = SynthConfig.tiny()
# Smallest useful config, for tests that generate several times.
MICRO = dataclasses.replace(TINY, train_places=2, test_places=2, queries=2, val_places=1, val_queries=2, gsv_places=1,
                            width=64, height=48, workers=1)  # fmt: skip
AT_SPLITS = ("train", "test/database", "test/queries", "val/database", "val/queries")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _at_fields(path: Path) -> list[str]:
    return path.name.split("@")


def _grey(path: Path) -> np.ndarray:
    """Downsampled grey image, flattened: coarse structure only."""
    return np.asarray(Image.open(path).convert("L").resize((32, 24), Image.BILINEAR), dtype=np.float64).reshape(-1)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation: insensitive to the brightness and contrast a condition changes."""
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def _east_north_heading(paths: list[Path]) -> np.ndarray:
    return np.array([[float(f[1]), float(f[2]), float(f[9])] for f in map(_at_fields, paths)])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "seed0_w1"
    summary = generate(out, dataclasses.replace(TINY, workers=1))
    assert summary["status"] == "written"
    return out


@pytest.fixture(scope="module")
def tiny_dir_two_workers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "seed0_w2"
    generate(out, dataclasses.replace(TINY, workers=2))
    return out


def test_same_seed_gives_identical_bytes_for_any_worker_count(tiny_dir: Path, tiny_dir_two_workers: Path) -> None:
    one, two = _files(tiny_dir), _files(tiny_dir_two_workers)
    assert sorted(one) == sorted(two)
    assert sum(name.endswith(".jpg") for name in one) == sum(TINY.image_counts().values())
    different = [name for name in one if one[name] != two[name]]
    assert different == []


def test_other_seed_gives_other_images(tiny_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "seed1"
    generate(other, dataclasses.replace(TINY, seed=1, workers=2))
    digests = {hashlib.sha1(data).digest() for name, data in _files(tiny_dir).items() if name.endswith(".jpg")}
    other_digests = {hashlib.sha1(data).digest() for name, data in _files(other).items() if name.endswith(".jpg")}
    assert len(other_digests) == sum(TINY.image_counts().values())
    assert digests.isdisjoint(other_digests)


def test_images_decode_at_the_configured_size(tiny_dir: Path) -> None:
    paths = sorted(tiny_dir.rglob("*.jpg"))
    assert len(paths) == sum(TINY.image_counts().values())
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (TINY.width, TINY.height)


def test_at_names_parse_and_their_latlon_matches_their_utm(tiny_dir: Path) -> None:
    paths = sorted((tiny_dir / "atname").rglob("*.jpg"))
    counts = {split: len(list((tiny_dir / "atname" / split).glob("*.jpg"))) for split in AT_SPLITS}
    assert counts == {k: v for k, v in TINY.image_counts().items() if k != "gsv"}
    for path in paths:
        f = _at_fields(path)
        # "", 14 fields, ".jpg": the layout of VPR-datasets-downloader (heading is item 9).
        assert len(f) == 16 and f[0] == "" and f[-1] == ".jpg", path.name
        east, north, zone, letter, lat, lon = float(f[1]), float(f[2]), int(f[3]), f[4], float(f[5]), float(f[6])
        assert len(f[1].split(".")[1]) == 2 and len(f[5].split(".")[1]) == 7 and letter.isupper()
        e2, n2, z2, l2 = utm.from_latlon(lat, lon)
        assert (z2, l2) == (zone, letter) == (10, "S")
        assert abs(e2 - east) < 1.0 and abs(n2 - north) < 1.0
        assert f[7].isalnum() and 0.0 <= float(f[9]) < 360.0 and len(f[9].split(".")[1]) == 2
        assert len(f[13]) == 6 and f[13].isdigit() and 1 <= int(f[13][4:]) <= 12  # YYYYMM


def test_gsv_csv_rows_and_image_files_correspond_one_to_one(tiny_dir: Path) -> None:
    city = TINY.gsv_city
    with open(tiny_dir / "gsv_cities" / "Dataframes" / f"{city}.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    assert tuple(header) == GSV_CSV_HEADER
    files = {p.name for p in (tiny_dir / "gsv_cities" / "Images" / city).iterdir()}
    names = [gsv_name(r[4], int(r[0]), int(r[1]), int(r[2]), int(r[3]), r[5], r[6], r[7]) for r in rows]
    assert len(names) == len(set(names)) == len(files) == TINY.gsv_places * TINY.gsv_images_per_place
    assert set(names) == files
    per_place = np.bincount([int(r[0]) for r in rows])
    assert len(per_place) == TINY.gsv_places and per_place.min() >= 4 and per_place.max() <= 8
    for r in rows:
        assert r[4] == city and 0 <= int(r[3]) < 360 and 1 <= int(r[2]) <= 12
        lat, lon = float(r[5]), float(r[6])
        assert lat < 0.0  # southern hemisphere
        assert utm.from_latlon(lat, lon)[2] == 55  # Melbourne; the @ city is in zone 10
    # The images of one place are years apart, as in GSV-Cities.
    years = {}
    for r in rows:
        years.setdefault(r[0], []).append(r[1])
    assert all(len(set(y)) == len(y) for y in years.values())


@pytest.mark.parametrize("split", ["test", "val"])
def test_every_query_has_a_database_image_nearby_with_a_similar_heading(tiny_dir: Path, split: str) -> None:
    db = _east_north_heading(sorted((tiny_dir / "atname" / split / "database").glob("*.jpg")))
    queries = _east_north_heading(sorted((tiny_dir / "atname" / split / "queries").glob("*.jpg")))
    assert len(queries) > 0
    for east, north, heading in queries:
        dist = np.hypot(db[:, 0] - east, db[:, 1] - north)
        turn = np.abs((db[:, 2] - heading + 180.0) % 360.0 - 180.0)
        assert np.any((dist < 25.0) & (turn <= TINY.query_jitter_deg + 0.01))


def test_train_and_test_are_different_parts_of_the_city(tiny_dir: Path) -> None:
    train = _east_north_heading(sorted((tiny_dir / "atname/train").glob("*.jpg")))
    test = _east_north_heading(sorted((tiny_dir / "atname/test/database").glob("*.jpg")))
    gap = np.hypot(train[:, None, 0] - test[None, :, 0], train[:, None, 1] - test[None, :, 1]).min()
    assert gap > 30.0


@pytest.mark.parametrize("split", ["test", "val"])
def test_a_query_differs_from_its_place_but_resembles_it_more_than_other_places(tiny_dir: Path, split: str) -> None:
    db_paths = sorted((tiny_dir / "atname" / split / "database").glob("*.jpg"))
    q_paths = sorted((tiny_dir / "atname" / split / "queries").glob("*.jpg"))
    db, db_grey = _east_north_heading(db_paths), [_grey(p) for p in db_paths]
    rng = np.random.default_rng(0)
    match_ncc, other_ncc, pixel_change = [], [], []
    for path, (east, north, heading) in zip(q_paths, _east_north_heading(q_paths)):
        dist = np.hypot(db[:, 0] - east, db[:, 1] - north)
        turn = np.abs((db[:, 2] - heading + 180.0) % 360.0 - 180.0)
        match = int(np.argmin(dist + 1000.0 * (turn > 30.0)))
        other = int(rng.choice(np.flatnonzero((dist > 25.0) | (turn > 60.0))))
        query = _grey(path)
        match_ncc.append(_ncc(query, db_grey[match]))
        other_ncc.append(_ncc(query, db_grey[other]))
        pixel_change.append(np.abs(query - db_grey[match]).mean())
    assert min(pixel_change) > 2.0  # conditions are applied to every query
    assert np.mean(match_ncc) > np.mean(other_ncc) + 0.1


def test_rerun_is_a_noop_and_another_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "data"
    assert generate(out, MICRO)["status"] == "written"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = generate(out, dataclasses.replace(MICRO, workers=2))  # the worker count is not part of the output
    assert again["status"] == "unchanged" and again["rendered"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    with pytest.raises(OutputDirError, match="seed"):
        generate(out, dataclasses.replace(MICRO, seed=7))
    flags = ["--out", str(out), "--preset", "tiny", "--quiet", "--train-places", "2", "--test-places", "2",
             "--queries", "2", "--val-places", "1", "--val-queries", "2", "--gsv-places", "1", "--width", "64",
             "--height", "48", "--workers", "1"]  # fmt: skip
    assert main(flags) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(flags[:-2] + ["--seed", "7"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(flags + ["--seed", "7", "--overwrite"]) == 0
    assert '"seed": 7' in (out / MANIFEST_NAME).read_text()


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generate(out, MICRO)
    reference = _files(out)
    # What a run killed while rendering leaves: its marker, no manifest, some images missing.
    (out / MANIFEST_NAME).unlink()
    (out / PARTIAL_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION, "config": manifest_config(MICRO)}))
    removed = sorted(out.rglob("*.jpg"))[::3]
    for path in removed:
        path.unlink()
    summary = generate(out, MICRO)
    assert summary["status"] == "resumed" and summary["rendered"] == len(removed)
    assert _files(out) == reference and not (out / PARTIAL_NAME).exists()


def test_a_folder_with_foreign_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        generate(tmp_path, MICRO)
    generate(tmp_path, MICRO, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # overwrite removes only what synth writes
    assert (tmp_path / MANIFEST_NAME).exists()


def test_help_describes_the_layout(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "atname/test/queries" in text and "gsv_cities/Dataframes" in text and "--train-places" in text
    assert "atname/val/database" in text and "atname/val/queries" in text and "--val-places" in text


def test_bad_values_are_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="gsv_images_per_place"):
        dataclasses.replace(TINY, gsv_images_per_place=9).validate()
    with pytest.raises(ConfigError, match="gsv_city"):
        dataclasses.replace(TINY, gsv_city="Synth_Melbourne").validate()
    with pytest.raises(ConfigError, match="val_queries"):
        dataclasses.replace(TINY, val_queries=-1).validate()
    with pytest.raises(ConfigError, match="blocks_x"):  # the @ city would reach the val city 5 km east
        dataclasses.replace(TINY, blocks_x=60).validate()
    dataclasses.replace(TINY, blocks_x=60, val_places=0).validate()  # without a val city it may be that wide
    assert main(["--out", str(tmp_path / "x"), "--width", "wide"]) == 2
    assert "width" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--widht", "10"])  # misspelled flag
    assert not (tmp_path / "x").exists()


def test_name_helpers() -> None:
    assert heading_text(359.999) == "0.00" and heading_text(-90.0) == "270.00"
    ids = {short_id(10, "seed", i) for i in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 10 and i.isalnum() for i in ids)
    name = at_name(551234.5, 4181000.25, 10, "s", 37.7, -122.4, "abc", 3, 90.0, 0.0, 0.0, "202201", "night-fog")
    assert name.split("@")[1:5] == ["551234.50", "4181000.25", "10", "S"] and name.endswith("@night-fog@.jpg")
    with pytest.raises(ValueError):
        at_name(0, 0, 10, "S", 0, 0, "a@b", 0, 0, 0, 0, "", "")


def test_overwrite_removes_only_the_files_of_the_recorded_dataset(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generate(out, MICRO)
    mine = out / "atname" / "train" / "my_photo.jpg"
    mine.write_bytes(b"mine")
    (out / "gsv_cities" / "notes").mkdir()
    (out / "gsv_cities" / "notes" / "n.txt").write_text("mine")
    other = dataclasses.replace(MICRO, seed=7, train_places=3)
    generate(out, other, overwrite=True)
    assert mine.read_bytes() == b"mine" and (out / "gsv_cities" / "notes" / "n.txt").read_text() == "mine"
    expected = {out / rel for _, rel in plan_dataset(other).jobs} | {mine}
    assert set(out.rglob("*.jpg")) == expected  # no image of the old dataset is left


def test_overwrite_refuses_a_folder_no_manifest_records(tmp_path: Path) -> None:
    real = tmp_path / "atname" / "train" / "@551000@4181000@10@S@@@@@@@@@@@.jpg"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"real data")
    with pytest.raises(OutputDirError, match="nothing was removed"):
        generate(tmp_path, MICRO, overwrite=True)
    assert real.read_bytes() == b"real data"


# The validation split: a third city, made like the test split, that changes nothing else.


def test_val_split_has_its_counts_and_at_names_in_a_city_of_its_own(tiny_dir: Path) -> None:
    db_paths = sorted((tiny_dir / "atname/val/database").glob("*.jpg"))
    q_paths = sorted((tiny_dir / "atname/val/queries").glob("*.jpg"))
    assert len(db_paths) == TINY.val_places * TINY.headings_per_place == 24
    assert len(q_paths) == TINY.val_queries == 12
    for path in db_paths + q_paths:
        f = _at_fields(path)
        assert len(f) == 16 and f[0] == "" and f[-1] == ".jpg", path.name
        east, north, lat, lon = float(f[1]), float(f[2]), float(f[5]), float(f[6])
        e2, n2, z2, l2 = utm.from_latlon(lat, lon)
        assert (z2, l2) == (int(f[3]), f[4]) == (10, "S") and abs(e2 - east) < 1.0 and abs(n2 - north) < 1.0
    # Database images of a place share a pano id, like the test split's; queries have their own.
    db_ids = [_at_fields(p)[7] for p in db_paths]
    assert sorted(np.unique(db_ids, return_counts=True)[1]) == [TINY.headings_per_place] * TINY.val_places
    q_ids = {_at_fields(p)[7] for p in q_paths}
    test_ids = {_at_fields(p)[7] for p in (tiny_dir / "atname/test").rglob("*.jpg")}
    assert len(q_ids) == len(q_paths) and q_ids.isdisjoint(db_ids) and (q_ids | set(db_ids)).isdisjoint(test_ids)
    manifest = json.loads((tiny_dir / MANIFEST_NAME).read_text())
    assert manifest["counts"]["atname"]["val/database"] == 24 and manifest["counts"]["atname"]["val/queries"] == 12
    origins = manifest["origins"]
    assert origins["atname/val"]["utm_east"] == pytest.approx(origins["atname"]["utm_east"] + 5000.0)


def test_the_val_split_changes_no_byte_of_train_test_or_gsv(tiny_dir: Path, tmp_path: Path) -> None:
    without = tmp_path / "no_val"
    generate(without, dataclasses.replace(TINY, val_places=0, workers=2))
    with_val, no_val = _files(tiny_dir), _files(without)
    assert not (without / "atname" / "val").exists()
    assert sum(name.startswith("atname/val/") for name in with_val) == 24 + 12
    others = sorted(name for name in with_val if not name.startswith("atname/val/") and name != MANIFEST_NAME)
    assert others == sorted(name for name in no_val if name != MANIFEST_NAME)
    assert len(others) == 96 + 32 + 24 + 32 + 1  # images of train, test, GSV, and the GSV CSV
    assert [name for name in others if with_val[name] != no_val[name]] == []


def test_val_places_are_far_from_every_train_and_test_place(tiny_dir: Path) -> None:
    val = _east_north_heading(sorted((tiny_dir / "atname/val").rglob("*.jpg")))
    seen_paths = sorted((tiny_dir / "atname/train").glob("*.jpg")) + sorted((tiny_dir / "atname/test").rglob("*.jpg"))
    seen = _east_north_heading(seen_paths)
    gap_m = np.hypot(val[:, None, 0] - seen[None, :, 0], val[:, None, 1] - seen[None, :, 1]).min()
    assert 1000.0 < gap_m < 6000.0  # its own city, about 5 km east in the same UTM zone


def test_val_images_differ_from_test_images(tiny_dir: Path) -> None:
    val_paths = sorted((tiny_dir / "atname/val").rglob("*.jpg"))
    test_paths = sorted((tiny_dir / "atname/test").rglob("*.jpg"))
    digest = lambda path: hashlib.sha1(path.read_bytes()).digest()  # noqa: E731
    assert {digest(p) for p in val_paths}.isdisjoint(digest(p) for p in test_paths)
    # Nor near copies: another city, not the test district rendered again.
    test_grey = np.stack([_grey(p) for p in test_paths])
    for path in val_paths:
        assert np.abs(test_grey - _grey(path)).mean(axis=1).min() > 2.0, path.name
