"""Logging for placeforge's jobs and watchers: one setup, one timestamped line per event on stderr.

    log = logging.getLogger(__name__)   # in a module: each event a person would grep for, one line
    setup_logging()                     # in a command's main(), never at import time

A line reads `2026-11-30 03:30:00 INFO placeforge.shards.build: resuming the interrupted build in OUT`
(local time); with several training ranks, `... WARNING rank 3 placeforge.trainer.train: ...`.
`print` stays for what a command answers: its result (a report, a table) on stdout, and the
one-line `PROG: error: MESSAGE` refusal that docs/errors.md lists.  Progress bars stay tqdm.

Only this project's loggers get the level.  Ray, DeepSpeed and torch keep their own handlers
and levels (they do not pass their lines on to the root logger); other libraries keep the
root's WARNING, and their warnings are written in the same format as ours.
"""

from __future__ import annotations

import logging
import os
import sys

LEVEL_ENV = "PLACEFORGE_LOG_LEVEL"  # the level of every command when main() does not pass one
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
# The loggers setup_logging sets the level of: the two top-level packages pyproject.toml installs
# (the stages are placeforge.trainer etc.; tests/test_logs.py checks the list against pyproject.toml).
PACKAGES = ("placeforge", "synthcity")
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def line_format(rank: int | None = None) -> str:
    """The logging format of a line: time, level, `rank N` when given, logger name, message."""
    where = "" if rank is None else f" rank {rank}"
    return f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s"


def resolve_level(name: str | None, rank: int | None = None) -> int:
    """A level name (any case; None or "" is INFO) -> its number, at least WARNING on a rank other than 0.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    key = (name or "INFO").strip().upper()
    if key not in LEVELS:
        raise ValueError(f"log level {name!r} is not one of {', '.join(LEVELS)}")
    if rank:  # only rank 0 reports progress; the others would repeat it
        return max(LEVELS[key], logging.WARNING)
    return LEVELS[key]


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to sys.stderr as it is when a line is written, not when the handler was
    made: a later redirect (pytest's capture, contextlib.redirect_stderr) is followed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always wins
        pass


def setup_logging(level: str | None = None, rank: int | None = None) -> None:
    """Write this project's log lines to stderr with a timestamp, level and logger name.

    Calling it again changes the level and format in place (one handler, never two): a command
    whose main() runs another command's main() in the same process still writes each line once.

    Args:
        level: DEBUG, INFO, WARNING or ERROR (any case); None reads $PLACEFORGE_LOG_LEVEL, else
            INFO.  An unknown name is reported as a warning and INFO is used: a typo in a log
            level should not stop a job.
        rank: this process's rank when a job has several: its lines say `rank N`, and a rank
            other than 0 writes WARNING and above only.  None for a single process.
    """
    name = os.environ.get(LEVEL_ENV) if level is None else level
    try:
        number, problem = resolve_level(name, rank), None
    except ValueError as error:
        number, problem = resolve_level(None, rank), error
    handler = next((h for h in logging.root.handlers if isinstance(h, _CurrentStderr)), None)
    if handler is None:
        handler = _CurrentStderr()
        logging.root.addHandler(handler)
    handler.setFormatter(logging.Formatter(line_format(rank), DATE_FORMAT))
    for package in PACKAGES:
        logging.getLogger(package).setLevel(number)
    if problem is not None:
        where = f"${LEVEL_ENV}: " if level is None else ""
        logging.getLogger(__name__).warning("%s%s; logging at %s", where, problem, logging.getLevelName(number))
