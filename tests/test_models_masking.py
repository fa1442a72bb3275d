"""Stage-1 MIM inputs: the patch mask, patchify, and the encoder on the visible patches."""

from __future__ import annotations

import pytest
import torch

from placeforge.models.decoder import encode_visible, patchify, random_patch_mask
from tests.tiny_models import images, tiny_mim


@pytest.mark.parametrize("num_patches,ratio,masked", [(64, 0.9, 58), (256, 0.9, 230), (16, 0.75, 12), (4, 0.9, 3)])
def test_random_patch_mask_exact_count(num_patches, ratio, masked):
    g = torch.Generator().manual_seed(0)
    mask, keep_idx = random_patch_mask(5, num_patches, ratio, g)
    assert mask.shape == (5, num_patches) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == masked).all()
    assert keep_idx.shape == (5, num_patches - masked)
    assert not mask.gather(1, keep_idx).any()  # kept patches are exactly the unmasked ones
    assert (keep_idx.diff(dim=1) > 0).all()  # sorted, no repeats
    assert len({tuple(row.tolist()) for row in keep_idx}) > 1  # each image draws its own mask
    again, _ = random_patch_mask(5, num_patches, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_patchify_order_matches_the_grid():
    image = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)  # grid 2 x 3 of 2-px patches
    patches = patchify(image, 2)  # [2, 6, 12]
    assert patches.shape == (2, 6, 12)
    for row in range(2):
        for col in range(3):
            for i in range(2):
                for j in range(2):
                    for c in range(3):
                        value = patches[1, row * 3 + col, (i * 2 + j) * 3 + c]
                        assert value == image[1, c, row * 2 + i, col * 2 + j]


def test_encode_visible_equals_full_forward_when_nothing_is_masked():
    encoder = tiny_mim().encoder.eval()
    x = images(2)
    full = encoder.forward_features(x)  # [2, 65, 64]
    every = torch.arange(64).expand(2, -1)
    torch.testing.assert_close(encode_visible(encoder, x, every), full, atol=1e-5, rtol=1e-5)
    # Any order of all patches gives the same tokens in that order: positions travel with the patches.
    perm = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    out = encode_visible(encoder, x, perm)
    torch.testing.assert_close(out[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1:], full[:, 1:].gather(1, perm[..., None].expand(-1, -1, 64)),
                               atol=1e-5, rtol=1e-5)
