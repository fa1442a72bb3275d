"""Tiny presets and inputs the model tests (tests/test_models_*.py) share: pure and fast, on CPU."""

from __future__ import annotations

import torch

from placeforge.models.decoder import SiameseMIM, SiameseMIMDecoder, decoder_config
from placeforge.models.encoders import encoder_spec

PATCH = 14  # vit_tiny_test


def images(batch: int, height: int = 112, width: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width or height, generator=torch.Generator().manual_seed(seed))


def tiny_mim(image_size: int = 112, seed: int = 0) -> SiameseMIM:
    torch.manual_seed(seed)
    encoder = encoder_spec("vit_tiny_test").build(image_size)
    return SiameseMIM(encoder, SiameseMIMDecoder(decoder_config("dec64d2b"), encoder.embed_dim, PATCH))
