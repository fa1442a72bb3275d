"""Where a run is (epoch, step, label version), saved beside every DeepSpeed checkpoint.

    checkpoints/epoch0003-step0/          DeepSpeed's model + optimizer states
    checkpoints/epoch0003-step0/train_state.json    this module: where a resume starts
    checkpoints/latest                    the tag of the newest *complete* checkpoint

A tag names where a resume starts: epoch e with s of its steps already done
(`epoch0003-step0` is an epoch boundary).  `latest` is written by us, last, after the
states and train_state.json are on disk, so it never points at a half-written
checkpoint; a checkpoint saved because the loss diverged does not move it.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

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


def rng_states() -> dict:
    """Global RNG states (masks are drawn from per-step generators, so these matter only for
    anything else that draws from the global RNGs)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_states(states: dict | None) -> None:
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
                               "checkpoint_every_steps"})


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every field a resume must not change (empty: resumable)."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_CHANGES)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


TAG_PATTERN = re.compile(r"epoch\d{4,}-step\d+")  # TrainState.tag, the only tags `latest` names


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



