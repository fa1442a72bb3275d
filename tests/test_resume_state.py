"""The trainer's own resume state is JSON it writes itself, never part of DeepSpeed's pickle.

A checkpoint folder holds train_state.json (counters) and one rng_rankNNNN.json per rank (the
global torch / numpy / python RNG states as plain numbers); a resume reads both from there, so
nothing of the trainer's is unpickled.  The slow test runs the real trainer (DeepSpeed on CPU).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from placeforge.trainer.train_state import read_rng_states, restore_rng_states, rng_file, write_rng_states
from tests.test_train import data, pretrain_args, train  # noqa: F401 - `data` is a fixture


def draws() -> tuple[list[float], list[float], list[float]]:
    """A few numbers from each global RNG (advances them)."""
    return torch.rand(5).tolist(), np.random.rand(5).tolist(), [random.random() for _ in range(5)]


def test_rng_states_round_trip_through_a_json_file(tmp_path):
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    draws()  # a state some way into each stream
    np.random.standard_normal()  # numpy keeps a cached gaussian: part of the state too
    write_rng_states(tmp_path, "epoch0000-step3", rank=1)
    expected = draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)  # perturb every generator
    assert draws() != expected
    restore_rng_states(read_rng_states(tmp_path, "epoch0000-step3", rank=1))
    assert draws() == expected
    saved = json.loads((tmp_path / "epoch0000-step3" / rng_file(1)).read_text())  # plain JSON: nothing to unpickle
    assert set(saved) == {"torch", "numpy", "python"}


def test_a_checkpoint_without_an_rng_file_resumes_with_the_rngs_as_they_are(tmp_path):
    assert read_rng_states(tmp_path, "epoch0001-step0", rank=0) is None
    torch.manual_seed(5)
    expected = torch.rand(3).tolist()
    torch.manual_seed(5)
    restore_rng_states(None)
    assert torch.rand(3).tolist() == expected


def test_a_damaged_rng_file_is_refused_naming_it(tmp_path):
    write_rng_states(tmp_path, "epoch0000-step1", rank=0)
    path = tmp_path / "epoch0000-step1" / rng_file(0)
    saved = json.loads(path.read_text())
    saved["numpy"]["keys"] = saved["numpy"]["keys"][:10]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=f"{path.name} is not an RNG state file of this trainer"):
        read_rng_states(tmp_path, "epoch0000-step1", rank=0)


@pytest.mark.slow
def test_resume_reads_the_rng_from_our_file_not_from_deepspeeds_pickle(data, tmp_path):  # noqa: F811
    out = tmp_path / "pre"
    args = pretrain_args(data, out, "--epochs", "1", "--max-steps-per-epoch", "3")
    train([*args, "--stop-after-steps", "1"])
    folder = out / "checkpoints" / "epoch0000-step1"
    assert (folder / rng_file(0)).is_file() and (folder / "train_state.json").is_file()
    # This test wrote the file, so it may unpickle it: DeepSpeed's states carry nothing of the trainer's.
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert not {"rng", "epoch", "step_in_epoch", "global_step", "config"} & set(states)
    expected = read_rng_states(out / "checkpoints", "epoch0000-step1", rank=0)
    assert expected is not None and expected["torch"].numel() == torch.get_rng_state().numel()
    (folder / rng_file(0)).unlink()  # a checkpoint of an older trainer: resumes, RNGs from the seed
    resumed = train([*args, "--resume"])
    assert "no RNG state" in resumed.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "epoch0001-step0"
    assert (out / "checkpoints" / "epoch0001-step0" / rng_file(0)).is_file()
