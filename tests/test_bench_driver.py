"""benchmarks/bench_driver.py at a few thousand rows: the generated sources are realistic enough to
reject for every reason they are built to, and the measuring child process reports counts that add up."""

from __future__ import annotations

import pyarrow.parquet as pq

from benchmarks.bench_driver import generate, main, run_size
from placeforge.ingest import read_source


def test_generated_sources_hold_every_kind_of_bad_input(tmp_path):
    sources = generate(tmp_path, 5_000, gsv_fraction=0.2, seed=1)
    reasons = {}
    for source in sources:
        result = read_source(*source)
        assert result.inputs == result.catalog.num_rows + result.rejects.num_rows
        reasons[source[0]] = set(result.rejects["reason"].to_pylist())
        zones = {(z, letter >= "N") for z, letter in zip(result.catalog["utm_zone"].to_pylist(),
                                                         result.catalog["utm_letter"].to_pylist())}
        assert len(zones) >= 3 and {north for _, north in zones} == {True, False}  # zones, both hemispheres
    assert reasons["atname"] == {"duplicate", "bad_name", "bad_coordinates", "not_an_image"}
    assert reasons["gsv_cities"] == {"missing_file", "not_in_metadata"}
    assert pq.read_table(sources[0][2]).num_rows == 4_000  # the atname list has exactly its share of rows


def test_a_measured_size_accounts_for_every_row(tmp_path, capsys):
    result = run_size(tmp_path, 3_000, gsv_fraction=0.1, seed=0)
    assert abs(result["inputs"] - 3_000) < 150  # GSV-Cities rows come in whole places
    assert result["planned"] + result["rejected"] == result["inputs"]
    assert result["planned"] > 0.8 * result["inputs"]
    assert set(result["phases"]) == {"ingest", "places", "plan", "write"} and result["peak_rss_bytes"] > 0
    assert main(["--rows", "2000", "--work", str(tmp_path / "w")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 1
