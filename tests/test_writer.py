"""One shard written for real: read back with plain webdataset and tarfile; bad images rejected;
the bytes are webdataset.TarWriter's; writing a shard never imports torch."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from placeforge.shards import writer as shard_writer
from placeforge.shards.writer import write_shard


def jpeg(seed, size=(64, 48)):
    arr = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG")
    return out.getvalue()


def plan_rows(tmp_path, files):
    rows = []
    for i, (sample, member, data) in enumerate(files):
        path = tmp_path / f"in{i}.jpg"
        if data is not None:
            path.write_bytes(data)
        rows.append(
            {
                "image_id": 1000 + i,
                "place_id": 7 if sample == "s000000000" else 8,
                "place_key": "utm:10N:1:2",
                "source": "atname",
                "dataset": "d",
                "relpath": path.name,
                "path": str(path),
                "sample_key": sample,
                "member": member,
                "part": 0,
                "parts": 1,
                "lat": 37.0,
                "lon": -122.0,
                "utm_east": 1.0,
                "utm_north": 2.0,
                "utm_zone": 10,
                "heading_deg": float("nan"),
            }
        )
    return pa.Table.from_pylist(rows)


def test_shard_round_trip_with_bad_images(tmp_path):
    good = [jpeg(i, (640, 480)) for i in range(4)]
    files = [
        ("s000000000", "000.jpg", good[0]),
        ("s000000000", "001.jpg", good[1][: len(good[1]) // 2]),  # truncated
        ("s000000000", "002.jpg", good[0]),  # byte-identical duplicate
        ("s000000000", "003.jpg", good[2]),
        ("s000000001", "000.jpg", b"not an image"),
        ("s000000001", "001.jpg", None),  # vanished before the read
        ("s000000001", "002.jpg", good[3]),
    ]
    plan = plan_rows(tmp_path, files)
    out = tmp_path / "shards"
    out.mkdir()
    result = write_shard(out, 3, plan, short_side=120, jpeg_quality=90)
    assert result.record.name == "shard-000003.tar" and result.record.images == 3
    reasons = sorted(r["reason"] for r in result.reject_rows)
    assert reasons == ["decode_error", "decode_error", "duplicate", "unreadable"]
    assert len(result.index_rows) + len(result.reject_rows) == len(files)

    samples = list(wds.WebDataset(str(out / "shard-000003.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["s000000000", "s000000001"]
    first = json.loads(samples[0]["json"])
    assert [m["member"] for m in first["images"]] == ["000.jpg", "001.jpg"]  # renumbered, contiguous
    assert [m["image_id"] for m in first["images"]] == [1000, 1003]
    assert first["images"][0]["heading_deg"] is None  # NaN written as null
    img = Image.open(io.BytesIO(samples[0]["001.jpg"]))
    assert min(img.size) == 120 and img.size == (160, 120)

    with tarfile.open(out / "shard-000003.tar") as tar:
        names = tar.getnames()
    assert names == ["s000000000.000.jpg", "s000000000.001.jpg", "s000000000.json", "s000000001.000.jpg", "s000000001.json"]
    assert not list(out.glob(".*tmp*"))


def test_rewrite_is_byte_identical(tmp_path):
    plan = plan_rows(tmp_path, [("s000000000", "000.jpg", jpeg(1)), ("s000000000", "001.jpg", jpeg(2))])
    out = tmp_path / "shards"
    out.mkdir()
    first = write_shard(out, 0, plan, 320, 90).record
    second = write_shard(out, 0, plan, 320, 90).record
    assert first.sha256 == second.sha256 and first.bytes == second.bytes


def test_failed_write_leaves_no_file(tmp_path):
    plan = plan_rows(tmp_path, [("s000000000", "000.jpg", jpeg(1))])
    with pytest.raises(OSError):
        write_shard(tmp_path / "missing-dir", 0, plan, 320, 90)
    assert not (tmp_path / "missing-dir").exists()


def test_a_full_disk_mid_shard_raises_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    plan = plan_rows(tmp_path, [("s000000000", "000.jpg", jpeg(1)), ("s000000001", "000.jpg", jpeg(2))])
    real_write = shard_writer._write_sample
    written = []

    def fill_up(tar, sample):  # the second sample hits a full disk
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(sample["__key__"])
        return real_write(tar, sample)

    monkeypatch.setattr(shard_writer, "_write_sample", fill_up)
    (tmp_path / "shards").mkdir()
    with pytest.raises(OSError) as raised:
        write_shard(tmp_path / "shards", 0, plan, 320, 90)
    assert raised.value.errno == errno.ENOSPC and written == ["s000000000"]
    assert list((tmp_path / "shards").iterdir()) == []  # neither the shard nor its temporary file
    monkeypatch.undo()  # space again: the same call now writes the whole shard
    result = write_shard(tmp_path / "shards", 0, plan, 320, 90)
    assert result.record.samples == 2 and [p.name for p in (tmp_path / "shards").iterdir()] == ["shard-000000.tar"]


def test_shard_bytes_are_webdatasets_tarwriter_bytes(tmp_path):
    """The shard is written with tarfile by webdataset's rules: re-writing its samples with
    webdataset.TarWriter (encoder off, mtime 0, as the shards were written before) gives the same bytes."""
    files = [("s000000000", "000.jpg", jpeg(1)), ("s000000000", "001.jpg", jpeg(2)), ("s000000001", "000.jpg", jpeg(3))]
    out = tmp_path / "shards"
    out.mkdir()
    write_shard(out, 0, plan_rows(tmp_path, files), 320, 90)
    shard = (out / "shard-000000.tar").read_bytes()
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["s000000000", "s000000001"]
    stream = io.BytesIO()
    with wds.TarWriter(stream, encoder=False, mtime=0.0) as reference:
        for sample in samples:  # the reader adds __url__ etc.; TarWriter skips "_" fields but __key__
            reference.write(sample)
    assert len(stream.getvalue()) == len(shard) and stream.getvalue() == shard


def test_writing_a_shard_does_not_import_torch(tmp_path):
    """A shard task's modules must not pull in torch (seconds of start-up in every Ray worker):
    write a shard in a fresh interpreter and look at sys.modules."""
    plan = plan_rows(tmp_path, [("s000000000", "000.jpg", jpeg(1))])
    plan_file = tmp_path / "plan.parquet"
    import pyarrow.parquet as pq

    pq.write_table(plan, plan_file)
    (tmp_path / "shards").mkdir()
    code = (
        "import sys, pyarrow.parquet as pq\n"
        "from placeforge.shards.build import build_one_shard\n"
        "from placeforge.shards.writer import write_shard\n"
        f"result = write_shard({str(tmp_path / 'shards')!r}, 0, pq.read_table({str(plan_file)!r}), 320, 90)\n"
        "assert result.record.images == 1\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'webdataset', 'torchvision')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
