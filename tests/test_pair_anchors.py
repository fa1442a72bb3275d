"""pair_anchors_per_place: the pair classifier trains on the hardest pairs of a few anchors per place."""

from __future__ import annotations

import pytest
import torch

from placeforge.trainer.losses import first_per_label


def test_first_per_label_by_hand():
    labels = torch.tensor([5, 3, 5, 5, 9, 3, 3, 9, 1])
    assert first_per_label(labels, 1).tolist() == [0, 1, 4, 8]
    assert first_per_label(labels, 2).tolist() == [0, 1, 2, 4, 5, 7, 8]
    assert first_per_label(labels, 9).tolist() == list(range(9))
    assert first_per_label(torch.tensor([], dtype=torch.long), 1).tolist() == []
    with pytest.raises(ValueError, match="k must be >= 1"):
        first_per_label(labels, 0)


def test_fewer_anchors_keep_the_same_hardest_pairs_and_logits():
    """With 1 anchor per place, the pairs are the full run's rows of each place's first anchor,
    scored exactly as in the full run; the step then runs the classifier on 2 x P pairs, not 2 x B."""
    from placeforge.models.encoders import EncoderConfig
    from placeforge.trainer.train_config import TrainConfig
    from placeforge.trainer.train_models import build_finetune_model

    cfg = TrainConfig(stage="finetune", encoder=EncoderConfig(image_size=56, descriptor_dim=16),
                      pair_aligned_similarity=True)
    place_ids = torch.tensor([7, 7, 7, 2, 2, 2, 4, 4, 4])
    images = torch.rand(9, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for per_place in (0, 1):
        torch.manual_seed(0)
        model = build_finetune_model(TrainConfig(**{**cfg.__dict__, "pair_anchors_per_place": per_place}), 4)
        model.eval()
        with torch.no_grad():
            outputs[per_place] = model(images, place_ids, torch.full((9,), -1))
    full, few = outputs[0], outputs[1]
    assert len(full["pairs"]) == 9 and full["pair_logits_total"] == 18
    assert few["pairs"][:, 0].tolist() == [0, 3, 6]  # each place's first image is its one anchor
    assert few["pair_logits_total"] == 6
    assert torch.equal(few["pairs"], full["pairs"][[0, 3, 6]])
    assert torch.allclose(few["pair_pos"], full["pair_pos"][[0, 3, 6]], atol=1e-6)
    assert torch.allclose(few["pair_neg"], full["pair_neg"][[0, 3, 6]], atol=1e-6)
    assert torch.equal(few["descriptors"], full["descriptors"])  # the global descriptor is untouched


def test_negative_pair_anchors_per_place_is_refused():
    from placeforge.trainer.train_config import TrainConfig

    with pytest.raises(ValueError, match="pair_anchors_per_place must be >= 0"):
        TrainConfig(stage="finetune", pair_anchors_per_place=-1).validate()
