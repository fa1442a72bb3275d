"""Where a run is (epoch, step, label version), saved beside every DeepSpeed checkpoint.

    checkpoints/epoch0003-step0/          DeepSpeed's model + optimizer states
    checkpoints/epoch0003-step0/rng_rank0000.json   this module: each rank's global RNG states
    checkpoints/epoch0003-step0/train_state.json    this module: where a resume starts
    checkpoints/latest                    the tag of the newest *complete* checkpoint

A tag names where a resume starts: epoch e with s of its steps already done
(`epoch0003-step0` is an epoch boundary).  `latest` is written by us, last, after the
states, the RNG files and train_state.json are on disk, so it never points at a
half-written checkpoint; a checkpoint saved because the loss diverged does not move it.

The trainer's own state is JSON written here, never put into DeepSpeed's pickled
`client_state`: a resume reads counters and RNGs without unpickling anything of ours
(what DeepSpeed unpickles itself is the trust boundary in docs/cluster.md).

Retention (`prune_checkpoints`, rank 0, once `latest` names a new checkpoint): the newest
N complete checkpoints stay, and so do the one `latest` names and any the caller keeps
(the best validated epoch's); older tags go, oldest first.  `diverged-*` folders and
anything not named like a tag are never touched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from placeforge.config import flat_dict
from placeforge.fileio import write_json_atomic, write_text_atomic

STATE_FILE = "train_state.json"
LATEST_FILE = "latest"


@dataclass(frozen=True)
class DistState:
    """This process's place in the job (from the launcher's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ) -> "DistState":
        """Read once, in main(); everything below gets this value passed in."""
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class TrainState:
    epoch: int = 0  # the epoch a resume starts in
    step_in_epoch: int = 0  # steps of that epoch already taken
    global_step: int = 0  # optimizer steps taken in all
    label_version: int | None = None  # stage 2: labels the next batches use
    num_classes: int = 1  # CosFace rows the saved weights have
    config: dict = field(default_factory=dict)  # the TrainConfig that wrote it

    @property
    def tag(self) -> str:
        return f"epoch{self.epoch:04d}-step{self.step_in_epoch}"


def rng_file(rank: int) -> str:
    """Name of rank `rank`'s RNG state file in a checkpoint folder (a rank's global RNGs are its own)."""
    return f"rng_rank{rank:04d}.json"


def write_rng_states(checkpoint_dir: Path, tag: str, rank: int) -> None:
    """Every rank, after `engine.save_checkpoint`: its global RNG states as plain JSON numbers.

    Masks are drawn from per-step generators, so these matter only for anything else that
    draws from the global RNGs.  The numpy state is (kind, keys [624] uint32, pos, has_gauss,
    cached_gaussian); python's `random.getstate()` is (version, [625] ints, gauss_next).
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    write_json_atomic(checkpoint_dir / tag / rng_file(rank), {
        "torch": torch.get_rng_state().tolist(),  # [5056] uint8
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    })


def read_rng_states(checkpoint_dir: Path, tag: str, rank: int) -> dict | None:
    """Rank `rank`'s states from `write_rng_states`, checked and ready for `restore_rng_states`;
    None when the checkpoint has no file for this rank (written by an older trainer, or by a
    run with fewer ranks).

    Raises:
        ValueError: the file is not one `write_rng_states` writes (damaged, or someone else's).
    """
    path = checkpoint_dir / tag / rng_file(rank)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        torch_state = torch.tensor(saved["torch"], dtype=torch.uint8)
        numpy_saved, python_saved = saved["numpy"], saved["python"]
        keys = np.array(numpy_saved["keys"], dtype=np.uint32)
        internal = tuple(int(v) for v in python_saved["internal"])
        if torch_state.shape != torch.get_rng_state().shape or keys.shape != (624,) or len(internal) != 625:
            raise ValueError("a state has the wrong length")
        gauss_next = python_saved["gauss_next"]
        return {"torch": torch_state,
                "numpy": (str(numpy_saved["kind"]), keys, int(numpy_saved["pos"]), int(numpy_saved["has_gauss"]),
                          float(numpy_saved["cached_gaussian"])),
                "python": (int(python_saved["version"]), internal, None if gauss_next is None else float(gauss_next))}
    except (ValueError, KeyError, TypeError, OverflowError, RuntimeError) as err:
        raise ValueError(f"{path} is not an RNG state file of this trainer ({type(err).__name__}: {err})") from None


def restore_rng_states(states: dict | None) -> None:
    """Set the global RNGs to what `read_rng_states` returned (None: leave them as they are)."""
    if not states:
        return
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def write_state(checkpoint_dir: Path, tag: str, state: TrainState, mark_latest: bool) -> None:
    """Rank 0, after `engine.save_checkpoint`: train_state.json, then (optionally) `latest`."""
    folder = checkpoint_dir / tag
    write_json_atomic(folder / STATE_FILE, asdict(state), sort_keys=True)
    if mark_latest:
        write_text_atomic(checkpoint_dir / LATEST_FILE, tag + "\n")


# Fields a resume may change: where things are, and how the work is spread, not what is learnt.
RESUMABLE_CHANGES = frozenset({"shards", "labels", "out", "init_from", "num_workers", "log_every",
                               "checkpoint_every_steps", "keep_checkpoints"})


def config_changes(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """'key: saved -> current' for every field a resume must not change (empty: resumable).

    Sections compare key by key (`augment.hue: 0.0 -> 0.5`).  A field the saved config lacks (a
    run from before the field existed) counts as its value in `defaults`: a field is added with the
    default that keeps the old behaviour.
    """
    saved, current, defaults = flat_dict(saved), flat_dict(current), flat_dict(defaults or {})
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    keys = sorted((set(saved) | set(current)) - RESUMABLE_CHANGES)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


TAG_PATTERN = re.compile(r"epoch(\d{4,})-step(\d+)")  # TrainState.tag, the only tags `latest` names


def tag_order(tag: str) -> tuple[int, int] | None:
    """(epoch, step_in_epoch) of a checkpoint tag, or None for any other name.

    Tags sort by these integers, not as strings: epoch10000 comes after epoch9999.
    """
    match = TAG_PATTERN.fullmatch(tag)
    return (int(match.group(1)), int(match.group(2))) if match else None


def read_latest(checkpoint_dir: Path) -> tuple[str, TrainState] | None:
    """(tag, state) of the newest complete checkpoint, or None when there is none."""
    latest = checkpoint_dir / LATEST_FILE
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not TAG_PATTERN.fullmatch(tag):  # `latest` is read from shared storage: never a path out of checkpoints/
        raise ValueError(f"{latest} names {tag[:80]!r}, not a checkpoint tag of this trainer "
                         "(epochNNNN-stepN): refusing to load it")
    path = checkpoint_dir / tag / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: checkpoint {tag} is incomplete")
    return tag, TrainState(**json.loads(path.read_text()))


def tags_to_prune(folders: Mapping[str, bool], keep_last: int, latest: str | None,
                  keep: Iterable[str] = ()) -> list[str]:
    """The checkpoint folders retention deletes, oldest first.

    Args:
        folders: every folder name in checkpoints/ -> whether it is complete (has train_state.json).
        keep_last: complete checkpoints kept, the newest by (epoch, step); 0 keeps everything.
        latest: the tag `latest` names; None (nothing marked complete yet) deletes nothing.
        keep: more tags to keep (the best validated epoch's checkpoint).
    Returns:
        Tags of this trainer's checkpoints that are neither among the newest `keep_last`
        complete ones, nor `latest`, nor in `keep`; an incomplete one (a save that died half-way)
        only when it is older than `latest`, as a newer one may still be re-saved.  Never a name
        that is not a tag: `diverged-*` folders and other people's folders stay.
    """
    if keep_last <= 0 or latest is None or tag_order(latest) is None:
        return []
    ours = sorted((name for name in folders if tag_order(name) is not None), key=tag_order)
    complete = [name for name in ours if folders[name]]
    kept = set(complete[-keep_last:]) | {latest} | set(keep)
    return [name for name in ours if name not in kept and (folders[name] or tag_order(name) < tag_order(latest))]


def prune_checkpoints(checkpoint_dir: Path, keep_last: int, keep: Iterable[str] = ()) -> list[str]:
    """Rank 0, after `write_state` marked the newest checkpoint `latest`: delete the folders
    `tags_to_prune` names; returns their tags.

    train_state.json goes first, so a deletion interrupted half-way leaves a folder that
    reads as incomplete, never as a checkpoint to count or resume from.
    """
    latest_file = checkpoint_dir / LATEST_FILE
    if keep_last <= 0 or not latest_file.is_file():
        return []
    folders = {entry.name: (entry / STATE_FILE).is_file() for entry in checkpoint_dir.iterdir()
               if entry.is_dir() and not entry.is_symlink()}
    doomed = tags_to_prune(folders, keep_last, latest_file.read_text().strip(), keep)
    for tag in doomed:
        (checkpoint_dir / tag / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(checkpoint_dir / tag)
    return doomed
