"""The linear LR schedule (Pair-VPR stage 2) at its landmarks, and the config key that picks it."""

from __future__ import annotations

import pytest

from placeforge.trainer.schedules import LR_SCHEDULES, cosine_with_warmup, linear_with_warmup


def test_linear_with_warmup_at_its_landmarks():
    base, final = 8e-5, 0.2 * 8e-5  # Pair-VPR stage 2: LinearLR from factor 1 to 0.2
    assert linear_with_warmup(0, 100, 0, base, final) == pytest.approx(base)
    assert linear_with_warmup(50, 100, 0, base, final) == pytest.approx(0.6 * base)  # half-way: 1 -> 0.2
    assert linear_with_warmup(75, 100, 0, base, final) == pytest.approx(0.4 * base)
    assert linear_with_warmup(100, 100, 0, base, final) == pytest.approx(final)
    assert linear_with_warmup(130, 100, 0, base, final) == pytest.approx(final)
    assert linear_with_warmup(5, 100, 10, base, final) == pytest.approx(base / 2)  # warm-up as the cosine's
    assert linear_with_warmup(55, 100, 10, base, final) == pytest.approx((base + final) / 2)
    # Equal ends, different paths: below the cosine in the first half of the decay, above it after.
    assert linear_with_warmup(30, 100, 0, base, final) < cosine_with_warmup(30, 100, 0, base, final)
    assert linear_with_warmup(70, 100, 0, base, final) > cosine_with_warmup(70, 100, 0, base, final)


def test_every_lr_schedule_name_is_a_config_choice():
    from typing import get_args, get_type_hints

    from placeforge.trainer.sections import OptimizerConfig
    from placeforge.trainer.train_config import TrainConfig

    assert set(get_args(get_type_hints(OptimizerConfig)["lr_schedule"])) == set(LR_SCHEDULES)
    assert TrainConfig().optimizer.lr_schedule == "cosine"  # stage 1 and the demo keep the cosine
