"""placeforge.logs: level names on plain values, then the real root logger writing into a
redirected stderr (no mocks: the handler follows sys.stderr, as pytest's capture relies on)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import pytest

from placeforge.logs import LEVEL_ENV, PACKAGES, resolve_level, setup_logging

REPO = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def test_resolve_level_names_ranks_and_unknown_names():
    assert resolve_level(None) == resolve_level("") == resolve_level("info") == logging.INFO
    assert resolve_level(" Debug ") == logging.DEBUG and resolve_level("ERROR", rank=0) == logging.ERROR
    assert resolve_level("INFO", rank=3) == resolve_level("DEBUG", rank=1) == logging.WARNING  # not rank 0
    assert resolve_level("ERROR", rank=3) == logging.ERROR
    with pytest.raises(ValueError, match="'verbose' is not one of DEBUG, INFO, WARNING, ERROR"):
        resolve_level("verbose")


def test_packages_are_the_installed_top_level_packages():
    """A package setup_logging does not know would log at the root's WARNING: its INFO lines lost."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    installed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(PACKAGES) == sorted({name.split(".")[0] for name in installed})


@pytest.fixture
def clean_logging(monkeypatch):
    """The root handlers and package levels as they were, after the test; no level from the environment."""
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    handlers = list(logging.root.handlers)
    levels = {name: logging.getLogger(name).level for name in PACKAGES}
    yield
    logging.root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def emitted(*records: tuple[str, int, str]) -> str:
    """What the loggers write to stderr for (logger, level, message) records."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        for name, level, message in records:
            logging.getLogger(name).log(level, message)
    return stderr.getvalue()


def test_lines_carry_time_level_and_logger_and_setup_is_idempotent(clean_logging):
    setup_logging()
    setup_logging()
    ours = [h for h in logging.root.handlers if type(h).__name__ == "_CurrentStderr"]
    assert len(ours) == 1  # called twice (a command running another's main), each line still written once
    text = emitted(("placeforge.shards.build", logging.INFO, "resuming the interrupted build in /x"),
                   ("placeforge.trainer.train", logging.DEBUG, "not at INFO"),
                   ("timm.models", logging.INFO, "another library's info: not ours to turn on"),
                   ("timm.models", logging.WARNING, "another library's warning"))
    lines = text.splitlines()
    assert len(lines) == 2, text
    assert re.fullmatch(rf"{STAMP} INFO placeforge\.shards\.build: resuming the interrupted build in /x", lines[0])
    assert re.fullmatch(rf"{STAMP} WARNING timm\.models: another library's warning", lines[1])


def test_a_rank_other_than_0_writes_warnings_only_and_names_itself(clean_logging):
    setup_logging(rank=3)
    text = emitted(("placeforge.trainer.train", logging.INFO, "resumed from X"),
                   ("placeforge.trainer.train", logging.WARNING, "w"))
    assert re.fullmatch(rf"{STAMP} WARNING rank 3 placeforge\.trainer\.train: w\n", text), text
    setup_logging(rank=0)
    line = emitted(("placeforge.trainer.train", logging.INFO, "r"))
    assert re.fullmatch(rf"{STAMP} INFO rank 0 placeforge\.trainer\.train: r\n", line)


def test_level_from_the_environment_and_a_misspelled_one(clean_logging, monkeypatch):
    monkeypatch.setenv(LEVEL_ENV, "warning")
    setup_logging()
    assert emitted(("placeforge.clustering.job", logging.INFO, "quiet")) == ""
    monkeypatch.setenv(LEVEL_ENV, "verbose")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        setup_logging()  # a typo is reported, not fatal
    assert f"WARNING placeforge.logs: ${LEVEL_ENV}: log level 'verbose' is not one of" in stderr.getvalue()
    assert "INFO placeforge.clustering.job: loud" in emitted(("placeforge.clustering.job", logging.INFO, "loud"))
    assert emitted(("placeforge.clustering.job", logging.DEBUG, "x")) == ""  # the fallback is INFO
    setup_logging("DEBUG")  # a level passed in wins over the environment
    assert "DEBUG placeforge.clustering.job: x" in emitted(("placeforge.clustering.job", logging.DEBUG, "x"))

