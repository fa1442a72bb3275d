"""It learns: tiny models overfit one batch, and each loss reaches the parameters it should.

Pure and fast: tiny presets on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from placeforge.models.decoder import patchify, random_patch_mask
from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.trainer.losses import masked_patch_mse, multi_similarity_loss, pair_bce_loss
from tests.tiny_models import PATCH, images, tiny_mim


def test_tiny_mim_overfits_one_batch():
    """A smooth image pair at 56 px (4 x 4 patches, 12 masked): the loss falls by more than half."""
    mim = tiny_mim(image_size=56)
    g = torch.Generator().manual_seed(0)
    x1 = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=56, mode="bilinear")
    x2 = x1.flip(-1)  # the same place seen mirrored
    mask, keep_idx = random_patch_mask(1, 16, 0.75, g)
    target = patchify(x1, PATCH)
    optimizer = torch.optim.Adam(mim.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = masked_patch_mse(mim(x1, x2, keep_idx), target, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_gem_descriptor_overfits_one_batch():
    """From random weights the tiny ViT's class token barely depends on the image; GeM over the
    patch tokens does, which is why the tiny recipe pools with GeM.  MS loss on one batch of
    4 places x 4 images must fall by half within 40 steps with GeM."""
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=56, mode="bilinear")  # 4 places
    x = (base.repeat_interleave(4, dim=0) + 0.05 * torch.randn(16, 3, 56, 56, generator=g)).clamp(0, 1)
    labels = torch.arange(4).repeat_interleave(4)
    torch.manual_seed(0)
    model = build_model(EncoderConfig(name="vit_tiny_test", image_size=56, pooling="gem"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = multi_similarity_loss(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("pair_trains_encoder", [True, False])
def test_pair_bce_reaches_the_encoder_only_when_asked(pair_trains_encoder):
    from placeforge.models.encoders import EncoderConfig
    from placeforge.trainer.train_config import TrainConfig
    from placeforge.trainer.train_models import build_finetune_model

    torch.manual_seed(0)
    cfg = TrainConfig(stage="finetune", encoder=EncoderConfig(image_size=56, descriptor_dim=16),
                      pair_trains_encoder=pair_trains_encoder)
    model = build_finetune_model(cfg, num_classes=4)
    out = model(images(4, 56), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    pair_bce_loss(out["pair_pos"], out["pair_neg"]).backward()
    encoder_grads = [p.grad for p in model.global_model.encoder.parameters() if p.grad is not None]
    assert bool(encoder_grads) == pair_trains_encoder
    assert all(p.grad is not None for p in model.pair.mlp.parameters())  # the classifier learns either way


@pytest.mark.parametrize("pooling", ["gem", "gem_grid"])  # gem_grid: CosFace rows of the whole descriptor
def test_a_batch_without_positives_still_reaches_every_parameter(pooling):
    """View-class positives can leave a P x K batch with no anchor that has a positive; the
    step must still run one graph over every parameter (ranks must agree) and add no pair loss."""
    from placeforge.models.encoders import EncoderConfig
    from placeforge.trainer.batches import GroupBatch
    from placeforge.trainer.engine import finetune_step
    from placeforge.trainer.train_config import TrainConfig
    from placeforge.trainer.train_models import build_finetune_model

    torch.manual_seed(0)
    cfg = TrainConfig(stage="finetune", encoder=EncoderConfig(image_size=56, descriptor_dim=16, pooling=pooling))
    model = build_finetune_model(cfg, num_classes=8)
    assert model.cosface.weight.shape == (8, 16)
    pixels = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = GroupBatch(images=pixels, place_ids=torch.tensor([1, 1, 2, 2]),
                       image_ids=torch.arange(4), class_ids=torch.tensor([0, 1, 2, 3]))  # every view differs
    terms = finetune_step(model, batch, cfg, torch.device("cpu"))
    assert float(terms["pair_bce"]) == 0.0 and float(terms["ms"]) == 0.0
    terms["loss"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not trainable
