"""Untrusted inputs where images are read: only regular files, at most MAX_IMAGE_BYTES each,
and test splits that cannot give recall (GLDv2) refused with one clear message.

A FIFO named *.jpg blocks whoever opens it until a writer appears; every read of one here
runs in a thread joined with a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from placeforge.catalog import REASONS
from placeforge.evaluation.testset import read_split
from placeforge.ingest import SourceError, listing, read_source
from placeforge.models.embedding import _read_file
from placeforge.pipelines.evaluate import main as evaluate_main

TIMEOUT_S = 20.0


def _jpeg(path: Path, side: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (10, 80, 160)).save(path, "JPEG")
    return path


def _big_jpeg(path: Path) -> Path:
    """A JPEG far larger than `_jpeg`'s (noise does not compress)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3)).save(path, "JPEG", quality=95)
    return path


def _in_thread(call: Callable[[], object], fifos: list[Path]) -> object:
    """call() in a thread; fail if it is still running after TIMEOUT_S.

    On a timeout, a writer opens and closes each FIFO so that a reader blocked in open()
    sees end-of-file and the thread ends.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except Exception as err:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(TIMEOUT_S)
        pytest.fail(f"still running after {TIMEOUT_S:g} s: a FIFO was opened")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def _at_name(lat: float, lon: float) -> str:
    return "@" * 5 + f"{lat}@{lon}" + "@" * 9 + ".jpg"


# ---------------------------------------------------------------- regular files only, capped


def test_new_reasons_are_known():
    assert {"unreadable", "too_large"} <= set(REASONS)


def test_ingest_rejects_a_fifo_and_an_oversize_file_without_opening_them(tmp_path, monkeypatch):
    root = tmp_path / "set"
    small = _jpeg(root / _at_name(37.7, -122.5))
    _big_jpeg(root / _at_name(37.8, -122.4))
    fifo = root / _at_name(37.9, -122.3)
    os.mkfifo(fifo)
    monkeypatch.setattr(listing, "MAX_IMAGE_BYTES", small.stat().st_size)
    result = _in_thread(lambda: read_source("atname", root), [fifo])
    assert result.catalog["relpath"].to_pylist() == [small.name]
    rejects = {r["input"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    assert rejects[fifo.name][0] == "unreadable" and "not a regular file (a FIFO)" in rejects[fifo.name][1]
    assert rejects[_at_name(37.8, -122.4)][0] == "too_large"
    assert f"over the {small.stat().st_size}-byte limit" in rejects[_at_name(37.8, -122.4)][1]
    assert result.inputs == 3


def test_no_labels_split_keeps_only_regular_files_of_at_most_the_cap(tmp_path, monkeypatch):
    root = tmp_path / "queries"
    good = _jpeg(root / "a.jpg")
    os.symlink(good, root / "b_link.jpg")  # a symlink to a regular file is fine
    _big_jpeg(root / "big.jpg")
    os.mkfifo(root / "x.jpg")
    os.symlink("/dev/null", root / "dev.jpg")  # a device behind a link
    (root / "folder.jpg").mkdir()  # a folder is walked, not read
    (root / "notes.txt").write_text("not an image, not an input")
    monkeypatch.setattr(listing, "MAX_IMAGE_BYTES", good.stat().st_size)
    split = _in_thread(lambda: read_split(f"atname:{root}", "queries", no_labels=True), [root / "x.jpg"])
    assert split.paths == [str(root / "a.jpg"), str(root / "b_link.jpg")]
    rejects = {r["input"]: r for r in split.rejects.to_pylist()}
    reasons = {"big.jpg": "too_large", "x.jpg": "unreadable", "dev.jpg": "unreadable"}
    assert {k: r["reason"] for k, r in rejects.items()} == reasons
    assert "a FIFO" in rejects["x.jpg"]["detail"] and "character device" in rejects["dev.jpg"]["detail"]
    assert {(r["source"], r["dataset"], r["stage"]) for r in rejects.values()} == {("atname", "queries", "ingest")}
    assert split.rejected == 3


def test_no_labels_split_of_only_unusable_files_says_why(tmp_path):
    root = tmp_path / "database"
    root.mkdir()
    os.mkfifo(root / "x.jpg")
    with pytest.raises(SourceError, match=r"no usable image files .*1 set aside, e\.g\. x\.jpg is not a regular file"):
        _in_thread(lambda: read_split(f"atname:{root}", no_labels=True), [root / "x.jpg"])


def test_embedding_reads_regular_files_only_and_at_most_the_cap(tmp_path, monkeypatch):
    good = _jpeg(tmp_path / "a.jpg")
    os.symlink(good, tmp_path / "link.jpg")
    big = _big_jpeg(tmp_path / "big.jpg")
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    (tmp_path / "folder.jpg").mkdir()
    monkeypatch.setattr(listing, "MAX_IMAGE_BYTES", good.stat().st_size)
    assert _read_file(str(good)) == good.read_bytes()
    assert _read_file(str(tmp_path / "link.jpg")) == good.read_bytes()
    assert _in_thread(lambda: _read_file(str(fifo)), [fifo]) is None
    assert _read_file(str(tmp_path / "folder.jpg")) is None
    assert _read_file(str(big)) is None
    assert _read_file(str(tmp_path / "missing.jpg")) is None
    monkeypatch.setattr(listing, "MAX_IMAGE_BYTES", big.stat().st_size)
    assert _read_file(str(big)) == big.read_bytes()  # exactly the cap is allowed


# ---------------------------------------------------------------- GLDv2 as a test split


def _gldv2(root: Path) -> list[str]:
    """GLDv2 train_clean layout with one landmark of 3 images (as placeforge.ingest.gldv2 reads)."""
    ids = [f"{i:x}" * 16 for i in range(10, 13)]
    for image_id in ids:
        _jpeg(root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")
    (root / "train_clean.csv").write_text(f"landmark_id,images\n42,{' '.join(ids)}\n")
    return ids


def test_gldv2_split_is_refused_for_recall_and_listed_with_no_labels(tmp_path):
    root = tmp_path / "gldv2"
    ids = _gldv2(root)
    with pytest.raises(SourceError, match="GLDv2 has landmark ids, no positions, so Recall@N within a radius"):
        read_split(f"gldv2:{root}", "database")
    split = read_split(f"gldv2:{root}", "database", no_labels=True)
    assert [Path(p).stem for p in split.paths] == ids and split.rejected == 0
    assert split.east_north is None


def test_evaluate_on_gldv2_prints_one_error_line_and_exits_2(tmp_path, capsys):
    root = tmp_path / "gldv2"
    _gldv2(root)
    out = tmp_path / "eval"
    spec = f"gldv2:{root}"
    code = evaluate_main(
        ["--checkpoint", str(tmp_path / "m.pt"), "--database", spec, "--queries", spec, "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("evaluate: error:") == 1 and "use --no-labels for predictions only" in err
    assert not out.exists()


def test_shard_writer_rejects_a_fifo_and_an_oversize_file_with_a_reason(tmp_path, monkeypatch):
    """The shard writer opens source images as the readers above do (the file may have changed
    since ingest listed it): a FIFO or an over-cap file becomes a reject, not a hang or a crash."""
    import pyarrow as pa

    from placeforge.shards.writer import write_shard

    small = _jpeg(tmp_path / "src" / "a.jpg", side=32)
    big = _big_jpeg(tmp_path / "src" / "big.jpg")
    fifo = tmp_path / "src" / "x.jpg"
    os.mkfifo(fifo)
    monkeypatch.setattr(listing, "MAX_IMAGE_BYTES", small.stat().st_size)
    rows = [{"image_id": i, "place_id": 7, "place_key": "p7", "source": "atname", "dataset": "d", "relpath": p.name,
             "path": str(p), "sample_key": "s000000000", "member": f"{i:03d}.jpg", "part": 0, "parts": 1, "lat": None,
             "lon": None, "utm_east": None, "utm_north": None, "utm_zone": None, "heading_deg": None}
            for i, p in enumerate([small, big, fifo])]
    (tmp_path / "shards").mkdir()
    result = _in_thread(lambda: write_shard(tmp_path / "shards", 0, pa.Table.from_pylist(rows), 16, 90), [fifo])
    assert [r["image_id"] for r in result.index_rows] == [0]
    rejects = {r["input"]: (r["reason"], r["detail"]) for r in result.reject_rows}
    assert rejects["big.jpg"][0] == "too_large"
    assert f"over the {small.stat().st_size}-byte limit" in rejects["big.jpg"][1]
    assert rejects["x.jpg"] == ("unreadable", "x.jpg is not a regular file (a FIFO)")
    assert {r["stage"] for r in result.reject_rows} == {"encode"}
