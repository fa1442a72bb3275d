"""File-list sources: a list of paths stands for the folder walk, and is untrusted input.

Every read checks inputs == catalog rows + rejects rows and compares with the walk of
the same files where the two must agree.  The one test that starts Ray is marked `ray`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from placeforge.catalog import REASONS
from placeforge.ingest import IngestResult, Source, SourceError, parse_source_args, read_source
from placeforge.ingest.filelist import read_file_list
from placeforge.pipelines.build_shards import build_parser
from placeforge.pipelines.build_shards import main as build_main
from placeforge.places import PlaceConfig, assign_places
from placeforge.shards.build import BuildConfig, _fingerprint
from placeforge.shards.plan import plan_shards
from placeforge.shards.writer import write_shard
from tests.conftest import at_name, jpeg_bytes


def _read(fmt: str, root: Path, file_list: Path | None = None) -> IngestResult:
    result = read_source(fmt, root, file_list)
    assert result.inputs == result.catalog.num_rows + result.rejects.num_rows
    assert set(result.rejects["reason"].to_pylist()) <= set(REASONS)
    return result


def _reasons(result: IngestResult) -> dict[str, tuple[str, str]]:
    """input -> (reason, detail)."""
    rows = result.rejects.to_pylist()
    return {r["input"]: (r["reason"], r["detail"]) for r in rows}


def _text_list(path: Path, entries: list[str]) -> Path:
    path.write_text("# made by the test\n\n" + "\n".join(entries) + "\n")
    return path


def _parquet_list(path: Path, entries: list[str | None]) -> Path:
    pq.write_table(pa.table({"path": pa.array(entries, pa.string()), "size": list(range(len(entries)))}), path)
    return path


def _walk_relpaths(root: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.fixture
def at_folder(tmp_path: Path) -> Path:
    """An @-folder in two subsets, with a bad name, a non-image and unusable coordinates."""
    root = tmp_path / "city_at"
    for i in range(4):
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "train" / at_name(551_007.0 + i, 4_180_007.0, heading=i * 90)).write_bytes(jpeg_bytes(i))
        (root / "test" / "queries").mkdir(parents=True, exist_ok=True)
        (root / "test" / "queries" / at_name(551_107.0 + i, 4_180_007.0)).write_bytes(jpeg_bytes(10 + i))
    (root / at_name(551_207.0, 4_180_007.0)).write_bytes(jpeg_bytes(20))  # at the root: subset null
    (root / "train" / "notes.txt").write_text("not an image")
    (root / "train" / "@1@2@.jpg").write_bytes(jpeg_bytes(21))
    (root / "train" / "@nan@nan@10@S@nan@nan@pano@@@@@@201905@@.jpg").write_bytes(jpeg_bytes(22))
    return root


def test_text_and_parquet_lists_give_the_walks_catalog_and_rejects(at_folder, tmp_path):
    walk = _read("atname", at_folder)
    relpaths = _walk_relpaths(at_folder)
    assert walk.inputs == len(relpaths) == 12 and walk.catalog.num_rows == 9
    # Out of order, with find(1)'s "./" prefix and a doubled slash: the same files.
    listed = [f"./{r}" for r in reversed(relpaths)]
    listed[0] = listed[0].replace("/", "//", 1)
    for file_list in (_text_list(tmp_path / "files.txt", listed), _parquet_list(tmp_path / "files.parquet", listed)):
        from_list = _read("atname", at_folder, file_list)
        assert from_list.catalog.equals(walk.catalog), file_list.name
        assert sorted(from_list.rejects.to_pylist(), key=str) == sorted(walk.rejects.to_pylist(), key=str)
        assert from_list.inputs == walk.inputs


def test_a_list_source_is_not_walked_or_stated(at_folder, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a file-list source must not walk or stat the folder")

    monkeypatch.setattr("placeforge.ingest.atname.list_files", forbidden)
    monkeypatch.setattr("placeforge.ingest.common.check_files", forbidden)
    file_list = _text_list(tmp_path / "files.txt", _walk_relpaths(at_folder))
    assert _read("atname", at_folder, file_list).catalog.num_rows == 9
    with pytest.raises(AssertionError, match="must not walk"):
        read_source("atname", at_folder)


def test_untrusted_entries_are_rejects_with_reasons_and_a_missing_file_is_rejected_when_read(at_folder, tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpeg_bytes(99))
    good = [f"train/{at_name(551_007.0 + i, 4_180_007.0, heading=i * 90)}" for i in range(4)]
    missing = "train/" + at_name(551_009.5, 4_180_007.0)
    entries = [*good, "../secret.jpg", "/etc/passwd", "train/../../secret.jpg", missing, good[0], f"./{good[1]}"]
    file_list = _text_list(tmp_path / "files.txt", entries)
    result = _read("atname", at_folder, file_list)

    assert result.inputs == len(entries) == 10  # comments and blank lines are not inputs
    rejects = _reasons(result)
    assert rejects["files.txt:line 7"][0] == "path_outside_root" and "'../secret.jpg'" in rejects["files.txt:line 7"][1]
    assert rejects["files.txt:line 8"][0] == "path_outside_root" and "absolute" in rejects["files.txt:line 8"][1]
    assert rejects["files.txt:line 9"][0] == "path_outside_root"
    assert rejects["files.txt:line 11"] == ("duplicate", f"{good[0]!r} is listed again (first at files.txt:line 3)")
    assert rejects["files.txt:line 12"][0] == "duplicate"
    assert len(rejects) == 5
    # Not stat'ed at ingest: the missing file is catalogued, and found when its shard is written.
    assert sorted(result.catalog["relpath"].to_pylist()) == sorted([*good, missing])

    kept, place_rejects = assign_places(result.catalog, PlaceConfig(min_images_per_place=1))
    assert place_rejects.num_rows == 0
    plan = plan_shards(kept, max_images_per_sample=16, images_per_shard=100, min_shards=1, seed=0)
    (tmp_path / "shards").mkdir()
    written = write_shard(tmp_path / "shards", 0, plan, short_side=32, jpeg_quality=80)
    assert [r["input"] for r in written.reject_rows] == [missing]
    assert written.reject_rows[0]["reason"] == "unreadable" and "does not exist" in written.reject_rows[0]["detail"]
    assert written.record.images == len(good)
    assert result.inputs == written.record.images + len(written.reject_rows) + result.rejects.num_rows


def test_list_problems_that_are_not_paths(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    text = tmp_path / "odd.txt"
    text.write_bytes(b"# comment\n   \nok.jpg\r\nbad\xff.jpg\n.\nnul\x00.jpg\n  spaced.jpg  \n")
    listing = read_file_list(text)
    assert listing.relpaths == ["ok.jpg", "spaced.jpg"]
    assert {(e.relpath, e.reason) for e in listing.skipped} == {
        ("odd.txt:line 4", "bad_name"), ("odd.txt:line 5", "bad_name"), ("odd.txt:line 6", "bad_name"),
    }  # fmt: skip
    listing = read_file_list(_parquet_list(tmp_path / "odd.parquet", ["b.jpg", None, "", "a.jpg"]))
    assert listing.relpaths == ["a.jpg", "b.jpg"]
    assert {(e.relpath, e.reason) for e in listing.skipped} == {("odd.parquet:row 2", "bad_row"),
                                                                 ("odd.parquet:row 3", "bad_row")}
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "nopath.parquet")
    with pytest.raises(SourceError, match="'path' column"):
        read_file_list(tmp_path / "nopath.parquet")
    pq.write_table(pa.table({"path": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(SourceError, match="not strings"):
        read_file_list(tmp_path / "ints.parquet")
    with pytest.raises(SourceError, match="cannot be read"):
        read_file_list(tmp_path / "nowhere.txt")
    with pytest.raises(SourceError, match="names no files"):
        read_source("atname", root, _text_list(tmp_path / "empty.txt", []))


GSV_HEADER = "place_id,year,month,northdeg,city_id,lat,lon,panoid\n"


def _gsv_folder(root: Path) -> list[str]:
    """Two cities; returns the image paths the CSV rows name (all written)."""
    relpaths = []
    for city, rows in {"Rome": [(0, "41.9", "12.5", "pA"), (1, "41.91", "12.51", "pB")],
                       "Oslo": [(0, "59.91", "10.75", "pC")]}.items():  # fmt: skip
        (root / "Dataframes").mkdir(parents=True, exist_ok=True)
        lines = [f"{p},2019,6,90,{city},{la},{lo},{pano}" for p, la, lo, pano in rows]
        (root / "Dataframes" / f"{city}.csv").write_text(GSV_HEADER + "\n".join(lines) + "\n")
        for p, la, lo, pano in rows:
            relpath = f"Images/{city}/{city}_{p:07d}_2019_06_090_{la}_{lo}_{pano}.jpg"
            (root / relpath).parent.mkdir(parents=True, exist_ok=True)
            (root / relpath).write_bytes(jpeg_bytes(len(relpaths)))
            relpaths.append(relpath)
    return relpaths


def test_gsv_cities_list_matches_the_walk_and_stands_for_the_images_folder(tmp_path):
    root = tmp_path / "gsv"
    named = _gsv_folder(root)
    (root / "Images" / "Rome" / "stray.jpg").write_bytes(jpeg_bytes(50))  # no row names it
    walk = _read("gsv_cities", root)
    assert walk.catalog.num_rows == 3 and walk.inputs == 4
    everything = [*named, "Images/Rome/stray.jpg"]
    for file_list in (_text_list(tmp_path / "g.txt", everything), _parquet_list(tmp_path / "g.parquet", everything)):
        from_list = _read("gsv_cities", root, file_list)
        assert from_list.catalog.equals(walk.catalog)
        assert from_list.rejects.equals(walk.rejects)

    # A row whose image the list leaves out is missing_file; unsafe and repeated entries are rejects.
    entries = [named[0], named[2], "../Oslo.csv", "/etc/passwd", named[2], "Images/Rome/stray.jpg"]
    result = _read("gsv_cities", root, _text_list(tmp_path / "partial.txt", entries))
    rejects = _reasons(result)
    assert rejects["Dataframes/Rome.csv:row 2"] == ("missing_file", f"{named[1]} is not in file list partial.txt")
    assert [rejects[f"partial.txt:line {n}"][0] for n in (5, 6, 7)] == ["path_outside_root"] * 2 + ["duplicate"]
    assert rejects["Images/Rome/stray.jpg"][0] == "not_in_metadata"
    assert sorted(result.catalog["relpath"].to_pylist()) == sorted([named[0], named[2]])
    assert result.inputs == 3 + 4  # the CSV rows, plus the listed paths no row accounts for


def test_msls_and_gldv2_lists_match_the_walk(tmp_path):
    msls = tmp_path / "msls"
    side = msls / "train_val" / "rome" / "query"
    (side / "images").mkdir(parents=True)
    (side / "raw.csv").write_text(",key,lon,lat,ca,captured_at,pano\n0,k1,12.5,41.9,10,0,False\n"
                                  "1,k2,12.51,41.91,20,0,False\n")
    for key in ("k1", "k2", "k3"):
        (side / "images" / f"{key}.jpg").write_bytes(jpeg_bytes(len(key)))
    walk = _read("msls", msls)
    images = [r for r in _walk_relpaths(msls) if r.endswith(".jpg")]
    from_list = _read("msls", msls, _text_list(tmp_path / "m.txt", images))
    assert walk.catalog.num_rows == 2 and from_list.catalog.equals(walk.catalog)
    k3 = "train_val/rome/query/images/k3.jpg"
    assert _reasons(walk)[k3][0] == _reasons(from_list)[k3][0] == "not_in_metadata"
    assert from_list.inputs == walk.inputs == 3

    gld = tmp_path / "gldv2"
    ids = ["0123456789abcdef", "fedcba9876543210"]
    for i in ids:
        (gld / "train" / i[0] / i[1] / i[2]).mkdir(parents=True)
        (gld / "train" / i[0] / i[1] / i[2] / f"{i}.jpg").write_bytes(jpeg_bytes(1))
    (gld / "train_clean.csv").write_text(f"landmark_id,images\n7,{ids[0]} {ids[1]}\n")
    walk = _read("gldv2", gld)
    listed = [f"train/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in ids]
    assert _read("gldv2", gld, _text_list(tmp_path / "gl.txt", listed)).catalog.equals(walk.catalog)
    partial = _read("gldv2", gld, _text_list(tmp_path / "gp.txt", [listed[0], "../x.jpg"]))
    assert sorted(r for r, _ in _reasons(partial).values()) == ["missing_file", "path_outside_root"]


def test_source_words_and_fingerprint(tmp_path):
    file_list = _text_list(tmp_path / "l.txt", ["a.jpg"])
    args = build_parser().parse_args(["--source", "atname:/d", str(file_list), "--source", "msls:/m", "--out", "o"])
    assert [parse_source_args(w) for w in args.source] == [
        Source("atname", Path("/d"), file_list), Source("msls", Path("/m"), None)
    ]
    with pytest.raises(ValueError, match="at most one file list"):
        parse_source_args(["atname:/d", str(file_list), str(file_list)])
    with pytest.raises(ValueError, match="each source needs its own --source"):
        parse_source_args(["atname:/d", "atname:/e"])
    assert Source("atname", tmp_path, file_list).label() == f"atname:{tmp_path} (file list {file_list})"

    plan = pa.table({"image_id": [1], "path": ["/d/a.jpg"], "shard_index": [0], "sample_key": ["k"], "member": [0]})
    cfg = BuildConfig()
    old_style = _fingerprint(cfg, [("atname", tmp_path)], plan)
    assert _fingerprint(cfg, [Source("atname", tmp_path)], plan) == old_style  # interrupted builds still resume
    assert _fingerprint(cfg, [Source("atname", tmp_path, file_list)], plan) != old_style


@pytest.mark.ray
def test_build_shards_from_a_list_accounts_for_every_listed_path(local_ray, at_folder, tmp_path, capsys):
    missing = "train/" + at_name(551_009.5, 4_180_007.0)
    entries = [*_walk_relpaths(at_folder), "../secret.jpg", missing]
    file_list = _parquet_list(tmp_path / "files.parquet", entries)
    out = tmp_path / "out"
    args = ["--source", f"atname:{at_folder}", str(file_list), "--out", str(out), "--min-shards", "2",
            "--short-side", "32", "--places.min-images-per-place", "1"]
    assert build_main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["inputs"] == len(entries) == counts["in_shards"] + counts["rejected"]
    assert counts["rejected_by_reason"]["path_outside_root"] == 1
    assert counts["rejected_by_reason"]["unreadable"] == 1  # the missing file, found by its shard task
    assert counts["in_shards"] == 9
    assert manifest["sources"] == [f"atname:{at_folder.resolve()} (file list {file_list.resolve()})"]
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {r["input"]: r["stage"] for r in rejects if r["reason"] in ("unreadable", "path_outside_root")} == {
        missing: "encode", "files.parquet:row 13": "ingest"
    }
