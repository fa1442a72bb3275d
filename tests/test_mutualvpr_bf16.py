"""MutualVPR under DeepSpeed's bf16 engine (the precision of the GPU recipes), on CPU: the
MulConv adapters' batch norms run, and an epoch's inactive CosPlace-group classifiers do not move.

torch's AdamW skips a parameter without a gradient; DeepSpeed's bf16 wrapper instead steps it
with a zero gradient, which `engine.activate_cosface_group` neutralises by giving the inactive
groups LR 0.  This checks that on a real DeepSpeed run, not only in fp32.
"""

from __future__ import annotations

import pytest
import torch

from placeforge.models.adapters import Fp32BatchNorm2d
from tests.test_mutualvpr_train import model_states, run_train, steps_of, tiny_run_args, write_grouped_data


def test_adapter_batch_norm_runs_in_float32_under_bf16_weights():
    """As DeepSpeed's bf16 engine leaves it: bf16 weight and bias, float32 running statistics.
    A plain BatchNorm2d refuses that; the adapter's computes in float32 and answers in bf16."""
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(8, eps=1e-3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    mixed = Fp32BatchNorm2d(8, eps=1e-3)
    mixed.load_state_dict(reference.state_dict())
    for param in mixed.parameters():
        param.data = param.data.bfloat16()
    grid = torch.randn(4, 8, 5, 5) * 3 + 1
    plain = torch.nn.BatchNorm2d(8, eps=1e-3)
    plain.load_state_dict(reference.state_dict())
    for param in plain.parameters():
        param.data = param.data.bfloat16()
    with pytest.raises(RuntimeError):
        plain(grid.bfloat16())
    for training in (True, False):
        reference.train(training)
        mixed.train(training)
        expected, got = reference(grid), mixed(grid.bfloat16())
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), expected, atol=0.05, rtol=0.02)
    assert mixed.running_mean.dtype == torch.float32 and int(mixed.num_batches_tracked) == 1
    assert torch.allclose(mixed.running_mean, reference.running_mean, atol=0.02)  # updated from bf16 inputs
    assert torch.allclose(mixed.running_var, reference.running_var, rtol=0.02)


@pytest.mark.slow
def test_bf16_run_moves_only_the_epochs_group_classifier(tmp_path):
    data = write_grouped_data(tmp_path)
    out = tmp_path / "run"
    # weight decay 0.05: an inactive classifier stepped at its own LR would shrink
    run_train([*tiny_run_args(data), "--precision", "bf16", "--optimizer.weight-decay", "0.05", "--optimizer.weight-decay-end", "0.05",
               "--out", str(out)])
    steps = steps_of(out)
    assert len(steps) == 6 and all(s["cosface"] > 0 for s in steps)
    after = [model_states(out, f"epoch{e:04d}-step0") for e in (1, 2, 3)]  # after epochs 0 (group 0), 1, 2 (group 0)
    heads = [f"cosface_groups.classifiers.{g}.weight" for g in (0, 1)]
    assert after[0][heads[0]].dtype == torch.bfloat16  # the bf16 engine's weights, not an fp32 run
    for (before, later), trained in (((0, 1), 1), ((1, 2), 0)):  # epoch 1 trains group 1, epoch 2 group 0
        assert not torch.equal(after[before][heads[trained]], after[later][heads[trained]])
        assert torch.equal(after[before][heads[1 - trained]], after[later][heads[1 - trained]])
