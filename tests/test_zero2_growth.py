"""CosFace growth between label versions under ZeRO-2 (the ViT-G recipes' stage), two CPU ranks.

Growing the classifier rebuilds the DeepSpeed engine around a new AdamW (trainer.train
`Run.grow_classes`); under ZeRO-2 every rank holds a slice of the flat optimizer state, so the
rebuild must happen on both ranks at the same step and leave them in step.  A run is stopped
in epoch 0 on label version 0, version 1 (new class ids: 148 rows) is written, and both ranks
resume: from epoch 1 they train on v1 with the grown classifier and end with identical weights.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from placeforge.clustering.labels import label_table, write_label_set
from tests.test_train import TINY, data, run_two_ranks, steps_of  # noqa: F401 - data is a fixture

pytestmark = pytest.mark.slow


def test_cosface_grows_under_zero2_on_two_ranks_and_they_stay_in_step(data, tmp_path):  # noqa: F811
    labels = tmp_path / "labels"
    shutil.copytree(data["labels"], labels)
    out = tmp_path / "fine"
    args = ["--stage", "finetune", "--shards", str(data["shards"]), "--labels", str(labels), "--out", str(out),
            "--batch.places-per-batch", "2", "--batch.images-per-place", "4", "--epochs", "2", "--max-steps-per-epoch", "2",
            "--follow-latest-labels", "true", "--zero-stage", "2", "--weights-digest", *TINY]
    run_two_ranks([*args, "--stop-after-steps", "1"], timeout=240)  # mid epoch 0, on v0
    ids = np.array(sorted(i for i in range(24 * 1000) if i % 1000 < 4), dtype=np.int64)
    classes = (ids // 1000) * 2 + ids % 2 + 100  # new class ids: CosFace grows to 148 rows
    table = label_table(ids, ids // 1000, np.array([f"p{i // 1000}" for i in ids], dtype=object),
                        np.zeros(len(ids)), np.zeros(len(ids)), classes, None, 1)
    write_label_set(labels, table, k=2, seed=0, cell_size_m=15.0, previous_version=0, retired_class_ids=[],
                    next_class_id=int(classes.max()) + 1, images_changed_class=None, images_new=0)
    outputs = run_two_ranks([*args, "--resume"], timeout=240)

    digests = [[line.split()[-1] for line in o.splitlines() if "final weights sha256" in line] for o in outputs]
    assert len(digests[0]) == 1 and digests[0] == digests[1]  # the ranks are still in step
    rows = steps_of(out)
    assert [r["label_version"] for r in rows] == [0, 0, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in rows) and all(r["cosface"] > 0 for r in rows)
    state = json.loads((out / "checkpoints" / "epoch0002-step0" / "train_state.json").read_text())
    assert state["label_version"] == 1 and state["num_classes"] == int(classes.max()) + 1 == 148
    weights = torch.load(out / "checkpoints" / "epoch0002-step0" / "mp_rank_00_model_states.pt", map_location="cpu",
                         weights_only=True)["module"]["cosface.weight"]
    assert weights.shape[0] == 148 and torch.isfinite(weights).all()
    assert not torch.equal(weights[100:], torch.zeros_like(weights[100:]))  # the new rows exist and trained
