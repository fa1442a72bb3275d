"""Keep a label set in step with a training run: a new label version for every new model export.

    python pipelines/relabel.py --shards DIR --labels LABELS_DIR --watch RUN/export --once     # from cron
    python pipelines/relabel.py --shards DIR --labels LABELS_DIR --watch RUN/export --interval-s 300
    ray job submit --working-dir . -- python pipelines/relabel.py --shards /shared/DIR \\
        --labels /shared/LABELS_DIR --watch /shared/RUN/export --interval-s 300              # long-lived

Each poll takes the newest export in --watch: the highest epoch among files named exactly
model_epochNNNN.pt (the trainer writes them atomically, so its temporary
.model_epoch0003.pt.tmp-123 files and the stage-1 mim_epochNNNN.pt files are never read).
If any label version in LABELS_DIR records that file's sha256 (any version, not only the
latest, so a restarted watcher never labels the same weights twice) it logs
"skip: ..." and does nothing.  Otherwise it runs one K-means round, as
`recluster.py --checkpoint FILE` does, and logs its report.  Every line the watcher writes
goes to stderr with its time ("2026-11-30 03:30:00 INFO pipelines.relabel: skip: ...";
placeforge/logs.py, $PLACEFORGE_LOG_LEVEL).

The round's config is the one recorded in the latest label version (so k, seed and the
cell size do not silently change between rounds), with --config FILE and the flags below
applied on top; the "(default: ...)" of each flag is the code default used by v0.

LABELS_DIR must already hold a version: write v0 first with
`python pipelines/recluster.py --shards DIR --labels LABELS_DIR`.  The watcher refuses to
start a label set by itself: the run it watches was trained on some label set, and a new
one in a misspelled folder would silently part from it.

Nothing is published by a failure: a newest export that fails to load, or that changes
while it is hashed, is reported and skipped this round; a failed round (a diverged model,
a damaged shard set) keeps the previous labels.  The long-lived watcher reports and polls
again after --interval-s; --once exits 1.

Exit status: 0 a version was written or there was nothing to do; 1 the round failed;
2 bad arguments, --watch not a folder, or LABELS_DIR without a version; 130 Ctrl-C.

cron (--once): e.g. `*/15 * * * * cd REPO && .venv/bin/python pipelines/relabel.py ... --once
>> relabel.log 2>&1`.  A run starts a local Ray (or joins --ray-address / $RAY_ADDRESS)
only when it has a round to run.  Runs may overlap (a round can outlast the cron period):
a poll holds LABELS_DIR/.relabel.lock, and a run that finds it held logs "skip: ...".

Long-lived (no --once): one Ray session serves the whole watch, started at the first round
that needs it; under `ray job submit` that is the job's cluster.  Ctrl-C ends the watch,
between rounds or during one, without publishing a partial version.  On a cluster, DIR,
LABELS_DIR and RUN/export must be on storage every node sees.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from placeforge.clustering.job import ReclusterConfig
from placeforge.clustering.labels import latest_version, list_versions, read_manifest
from placeforge.config import (
    add_config_arguments,
    config_flags,
    config_from_args,
    from_mapping,
    load_file,
)
from placeforge.fileio import file_sha256
from placeforge.logs import setup_logging
from placeforge.pipelines.shell import add_ray_arguments, script_parser

CHECKPOINT_NAME = re.compile(r"^model_epoch(\d{4,})\.pt$")  # what trainer/train.py exports
LOCK_FILE = ".relabel.lock"
log = logging.getLogger("placeforge.pipelines.relabel")  # not __name__: run as a script, that is "__main__"

# --- pure core ---------------------------------------------------------------------------


def checkpoint_epoch(name: str) -> int | None:
    """The epoch of an export named exactly model_epochNNNN.pt (4 or more digits), else None."""
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def newest_checkpoint(names: Iterable[str]) -> str | None:
    """The export name with the highest epoch (ties: the last name in sort order), None if none."""
    exports = [(epoch, name) for name in names if (epoch := checkpoint_epoch(name)) is not None]
    return max(exports)[1] if exports else None


def version_made_from(sha256: str, encoder_sha256: Mapping[int, str | None]) -> int | None:
    """The newest label version made from weights with this sha256, or None: relabel.

    Args:
        encoder_sha256: label version -> its manifest's encoder_sha256 (None for v0).
    """
    made = [version for version, sha in encoder_sha256.items() if sha == sha256]
    return max(made) if made else None


# --- I/O shell -------------------------------------------------------------------------


class CheckpointChanged(RuntimeError):
    """The export was replaced or rewritten while it was being hashed."""


def _signature(path: Path) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


@contextlib.contextmanager
def _poll_lock(labels_dir: Path) -> Iterator[bool]:
    """Hold LABELS_DIR/.relabel.lock (True) or, if another process holds it, yield False."""
    with open(labels_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Watcher:
    """State kept across polls: the Ray session (opened on the first round) and known hashes."""

    def __init__(self, shards: Path, labels: Path, export_dir: Path, overrides: dict, config_file: Path | None,
                 ray_address: str | None, num_cpus: int | None) -> None:
        self.shards, self.labels, self.export_dir = shards, labels, export_dir
        self.overrides, self.config_file = overrides, config_file
        self.ray_address, self.num_cpus = ray_address, num_cpus
        self._ray = contextlib.ExitStack()
        self._ray_open = False
        self._hashes: dict[tuple[int, int, int, int], str] = {}  # a multi-GB export is hashed once per file

    def close(self) -> None:
        self._ray.close()

    def poll(self) -> int:
        """One poll: 0 a version was written or nothing to do, 1 this round failed."""
        try:
            name = newest_checkpoint(p.name for p in self.export_dir.iterdir() if p.is_file())
        except OSError as error:
            return _failed(f"cannot list {self.export_dir}: {error}")
        if name is None:
            log.info("skip: no model_epochNNNN.pt in %s yet", self.export_dir)
            return 0
        with _poll_lock(self.labels) as held:
            if not held:
                log.info("skip: another relabel holds %s (a round is running)", self.labels / LOCK_FILE)
                return 0
            return self._label(self.export_dir / name)

    def _label(self, path: Path) -> int:
        from placeforge.clustering.job import ReclusterError, recluster
        from placeforge.models.checkpoint import CheckpointError, inspect_model_checkpoint

        try:
            sha = self._sha256(path)
        except (CheckpointChanged, OSError) as error:
            return _failed(f"skipped {path.name} this round: {error}")
        made = version_made_from(sha, {v: read_manifest(self.labels, v).encoder_sha256
                                       for v in list_versions(self.labels)})
        if made is not None:
            log.info("skip: %s (sha256 %s) is already labelled as v%04d", path.name, sha[:12], made)
            return 0
        latest = latest_version(self.labels)
        kept = f"v{latest:04d} stays the latest version" if latest is not None else "no version written"
        try:
            inspect_model_checkpoint(path)  # a bad file is refused here, before Ray is started for it
            cfg = self._round_config(latest)
            self._open_ray()
            summary = recluster(self.shards, self.labels, cfg, checkpoint=path, ray_address=self.ray_address,
                                num_cpus=self.num_cpus)
        except CheckpointError as error:
            return _failed(f"skipped {path.name} this round; {kept}: {error}")
        except (ReclusterError, ValueError, OSError) as error:  # ConfigError is a ValueError
            return _failed(f"round with {path.name} failed; {kept}: {error}")
        except Exception as error:  # a Ray task or actor failure: the watcher goes on
            from ray.exceptions import RayError

            if not isinstance(error, RayError):
                raise
            return _failed(f"round with {path.name} failed in Ray; {kept}: {type(error).__name__}: {error}")
        for line in summary.report().splitlines():  # one timestamped line each, as every line of the watch
            log.info("%s", line)
        if summary.manifest.encoder_sha256 != sha:
            log.warning("%s changed during the round; v%04d records the file it read (sha256 %s)", path.name,
                        summary.manifest.version, summary.manifest.encoder_sha256)
        return 0

    def _sha256(self, path: Path) -> str:
        before = _signature(path)
        if before not in self._hashes:
            sha = file_sha256(path)
            if _signature(path) != before:
                raise CheckpointChanged(f"{path} changed while it was being hashed")
            self._hashes[before] = sha
        return self._hashes[before]

    def _round_config(self, latest: int | None) -> ReclusterConfig:
        """The latest version's recorded config, then --config FILE, then the flags."""
        cfg = ReclusterConfig()
        if latest is not None:
            recorded = read_manifest(self.labels, latest).params.get("config", {})
            cfg = from_mapping(ReclusterConfig, recorded, where=f"label version v{latest:04d}")
        if self.config_file is not None:
            cfg = from_mapping(ReclusterConfig, load_file(self.config_file), base=cfg, where=str(self.config_file))
        return from_mapping(ReclusterConfig, self.overrides, base=cfg, where="command line")

    def _open_ray(self) -> None:
        if not self._ray_open:
            from placeforge.raysession import ray_session

            # recluster() enters ray_session too; finding Ray running, it leaves it up between rounds.
            self._ray.enter_context(ray_session(self.ray_address, self.num_cpus))
            self._ray_open = True


def _failed(message: str) -> int:
    log.error("%s", message)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser("relabel.py", __doc__)
    parser.add_argument("--shards", required=True, type=Path, help="the complete shard set the run trains on")
    parser.add_argument("--labels", required=True, type=Path, help="label-set folder holding v0000/ at least")
    parser.add_argument("--watch", required=True, type=Path, metavar="CHECKPOINT_DIR",
                        help="the training run's export/ folder (model_epochNNNN.pt files)")
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds between polls (default: 60)")
    once = parser.add_mutually_exclusive_group()
    once.add_argument("--once", action="store_true", help="one poll, then exit (for cron)")
    once.add_argument("--max-polls", type=int, default=None, metavar="N",
                      help="stop after N polls, exiting with the last poll's status (default: forever)")
    add_ray_arguments(parser)
    add_config_arguments(parser, ReclusterConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    max_polls = 1 if args.once else args.max_polls
    if not args.interval_s > 0 or (max_polls is not None and max_polls < 1):
        parser.error("--interval-s must be > 0 and --max-polls >= 1")
    # A refusal before the first poll is one `relabel: error:` line (docs/errors.md), not a log line.
    try:
        config_from_args(ReclusterConfig, args)  # bad flags or file fail now, not at the first round
    except (ValueError, OSError) as error:  # ConfigError, or a value validate() refuses
        print(f"relabel: error: {error}", file=sys.stderr)
        return 2
    if not args.watch.is_dir():
        print(f"relabel: error: --watch {args.watch} is not a folder (a training run's export/)", file=sys.stderr)
        return 2
    if latest_version(args.labels) is None:
        print(f"relabel: error: {args.labels} holds no label version; write v0 first with "
              f"`python pipelines/recluster.py --shards {args.shards} --labels {args.labels}`", file=sys.stderr)
        return 2
    # The flags given, as config_from_args reads them; applied per round over the latest version's config.
    overrides = config_flags(args)
    config_file = Path(args.config) if args.config else None
    watcher = Watcher(args.shards, args.labels, args.watch, overrides, config_file, args.ray_address, args.num_cpus)
    status, polls = 0, 0
    try:
        with contextlib.closing(watcher):
            while True:
                status = watcher.poll()
                polls += 1
                if max_polls is not None and polls >= max_polls:
                    return status
                time.sleep(args.interval_s)
    except KeyboardInterrupt:
        log.warning("interrupted after %d poll(s); no partial version is published", polls)
        return 130


if __name__ == "__main__":
    sys.exit(main())
