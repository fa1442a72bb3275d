"""The shell every pipeline script shares: its parser, its Ray flags and its error exit.

A script's `main()` builds its parser with `script_parser`, adds `add_ray_arguments`, and
runs its body through `run_guarded`, so every job reads and fails the same way: a misspelled
flag is an error (no abbreviations), and an expected failure is one `PROG: error: ...` line
on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def script_parser(prog: str, doc: str, split_epilog: bool = False) -> argparse.ArgumentParser:
    """An argparse parser for a pipeline script, its module docstring as the help text.

    Args:
        split_epilog: show the docstring's first paragraph as the description and the rest
            after the flags (for long docstrings); else the whole docstring comes first.
    """
    description, epilog = (doc.split("\n\n", 1) + [""])[:2] if split_epilog else (doc, None)
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a misspelled flag must fail, not match a longer one
    )


def add_ray_arguments(parser: argparse.ArgumentParser, resources_flag: str | None = None,
                      resources_help: str = "") -> None:
    """--ray-address and --num-cpus, plus a --task-resources / --actor-resources flag when named."""
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to use (default: $RAY_ADDRESS, else a Ray already running on this "
                        "machine from `ray start --head`, else a new local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of a new local Ray (default: all; a running Ray keeps its own)")
    if resources_flag:
        parser.add_argument(resources_flag, metavar="NAME=AMOUNT[,...]", default=None, help=resources_help)


def run_guarded(prog: str, body: Callable[[], str | None], errors: tuple[type[BaseException], ...]) -> int:
    """Run `body`; print the text it returns (the command's result) and return 0, or turn one of
    `errors` into `PROG: error: message` on stderr and return 2.

    Both are printed, not logged: they are what the command answers (docs/errors.md lists the
    refusal lines as they are); the job's events on the way are log lines (placeforge/logs.py)."""
    try:
        result = body()
    except errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if result:
        print(result)
    return 0
