"""Choosing a reader: the format registry and the `format:path` source spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from placeforge.ingest import READERS, parse_source_spec, read_source


def test_unknown_format_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="valid formats: atname, gldv2, gsv_cities, msls"):
        read_source("sfxl", tmp_path)
    assert sorted(READERS) == ["atname", "gldv2", "gsv_cities", "msls"]


def test_parse_source_spec():
    assert parse_source_spec("gsv_cities:/data/gsv:v2") == ("gsv_cities", Path("/data/gsv:v2"))
    with pytest.raises(ValueError, match="has no ':'"):
        parse_source_spec("/data/gsv")
    with pytest.raises(ValueError, match="unknown source format 'gsv'"):
        parse_source_spec("gsv:/data/gsv")
    with pytest.raises(ValueError, match="no path"):
        parse_source_spec("atname:")
