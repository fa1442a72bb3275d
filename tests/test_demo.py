"""The README's main job at the tiny preset: synthetic city -> catalog -> shards -> read back."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from clustering.labels import latest_version, read_labels
from placeforge.cli import demo, main
from shards.manifest import read_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo(["--out", str(out), "--preset", "tiny", "--num-cpus", "2"]) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(out / "shards")
    counts = manifest.counts
    assert counts["inputs"] == counts["in_shards"] + counts["rejected"] and counts["in_shards"] > 100
    assert f"{counts['in_shards']} images" in printed  # the read-back saw every image
    catalog = pq.read_table(out / "shards" / "catalog.parquet")
    assert set(catalog.column("source").to_pylist()) == {"atname", "gsv_cities"}
    assert set(catalog.column("utm_zone").to_pylist()) == {10, 55}  # San Francisco and Melbourne
    letters = set(catalog.column("utm_letter").to_pylist())
    assert any(l >= "N" for l in letters) and any(l < "N" for l in letters)
    assert latest_version(out / "labels") == 0
    labels = read_labels(out / "labels")
    assert sorted(labels.column("image_id").to_pylist()) == sorted(catalog.column("image_id").to_pylist())

    assert demo(["--out", str(out), "--preset", "tiny", "--num-cpus", "2"]) == 0  # a re-run reuses everything
    assert "nothing to do" in capsys.readouterr().out and latest_version(out / "labels") == 0


def test_cli_lists_commands_and_rejects_unknown_ones(capsys):
    assert main([]) == 0
    assert "build-shards" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "unknown command" in capsys.readouterr().err
