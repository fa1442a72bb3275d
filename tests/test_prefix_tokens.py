"""Class and register tokens are skipped wherever patch tokens are used.

A DINOv2-with-registers encoder puts P = 5 prefix tokens (class, 4 registers) before its
patches.  Each consumer is run on the tiny registers preset (2 blocks, width 64): the global
head (GeM), the stage-1 encoder path, the stage-2 pair classifier, the embedding actor that
reclustering and evaluation share, the evaluation feature store and the re-ranker.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from placeforge.evaluation.dense_store import FeatureStore, StoreKey
from placeforge.evaluation.rerank import pair_scores
from placeforge.models.checkpoint import load_pair_classifier, save_model_checkpoint
from placeforge.models.decoder import SiameseMIM, SiameseMIMDecoder, decoder_config, encode_visible
from placeforge.models.embedding import Embedder
from placeforge.models.encoders import EncoderConfig, GlobalDescriptorModel, build_model, decode_images, encoder_spec
from placeforge.models.heads import PairClassifier
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_finetune_model
from tests.conftest import jpeg_bytes

PRESET = "vit_tiny_reg4_dinov2_test"
SIZE = 56  # a 4 x 4 grid
PREFIX, PATCHES, WIDTH = 5, 16, 64


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_gem_pools_patch_tokens_only_and_cls_reads_the_class_token():
    torch.manual_seed(0)
    model = build_model(EncoderConfig(PRESET, SIZE, 16, "gem")).eval()
    assert model.encoder.num_prefix_tokens == PREFIX
    with torch.no_grad():
        tokens = model.forward_features(images(3))  # [3, 5 + 16, 64]
        assert tokens.shape == (3, PREFIX + PATCHES, WIDTH)
        by_hand = F.normalize(model.head(model.gem(F.normalize(tokens[:, PREFIX:], dim=-1))), dim=-1)
        torch.testing.assert_close(model.pool(tokens), by_hand)
        loud_registers = tokens.clone()
        loud_registers[:, 1:PREFIX] = 1e3  # what the registers hold must not reach the descriptor
        torch.testing.assert_close(model.pool(loud_registers), by_hand)
        cls_model = GlobalDescriptorModel(model.encoder, 16, "cls").eval()
        torch.testing.assert_close(cls_model.pool(loud_registers), F.normalize(cls_model.head(tokens[:, 0]), dim=-1))


def test_an_encoder_without_a_class_token_is_refused():
    encoder = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                                class_token=False, reg_tokens=2, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        GlobalDescriptorModel(encoder)


def test_stage1_encodes_patches_of_a_registers_encoder():
    torch.manual_seed(0)
    encoder = build_model(EncoderConfig(PRESET, SIZE)).encoder.eval()
    x = images(2)
    every_patch = torch.arange(PATCHES).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(encode_visible(encoder, x, every_patch), encoder.forward_features(x))
        mim = SiameseMIM(encoder, SiameseMIMDecoder(decoder_config("dec64d2b"), WIDTH, 14))
        assert mim(x, images(2, seed=1), every_patch[:, :3]).shape == (2, PATCHES, 14 * 14 * 3)


def test_stage2_pair_classifier_reads_patch_tokens_and_every_trainable_parameter_learns():
    torch.manual_seed(0)
    cfg = TrainConfig(stage="finetune", encoder=EncoderConfig(PRESET, SIZE), decoder="dec64d2b")
    model = build_finetune_model(cfg, num_classes=4)
    place_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = model(images(8), place_ids, place_ids)  # the pair classifier raises if handed 21 tokens
    assert out["has_pairs"] and out["pair_pos"].shape == out["pair_neg"].shape == (8,)
    (out["pair_neg"] - out["pair_pos"] + out["descriptors"].sum() + out["cosface"].sum()).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert not model.global_model.encoder.mask_token.requires_grad  # DINOv2's, frozen as in Pair-VPR


def test_embedder_store_and_reranker_keep_patch_tokens_only(tmp_path):
    torch.manual_seed(0)
    cfg = EncoderConfig(PRESET, SIZE, 16, "cls")
    model = build_model(cfg).eval()
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), WIDTH, 14), hidden_dim=32).eval()
    checkpoint = save_model_checkpoint(model, cfg, tmp_path / "model.pt", pair=pair, decoder="dec64d2b")

    jpegs = [jpeg_bytes(seed) for seed in range(3)]
    embedder = Embedder(str(checkpoint), id_column="row", keep_tokens=True)  # reclustering's and evaluation's actor
    out = embedder({"row": np.arange(3), "jpeg": np.array(jpegs, dtype=object)})
    # evaluation/job.py sizes the store as (side * side, embed_dim): patches only.
    side = SIZE // encoder_spec(PRESET).patch_size
    assert out["tokens"].shape == (3, side * side, WIDTH) == (3, PATCHES, WIDTH)
    with torch.no_grad():
        expected = model.forward_features(decode_images(jpegs, SIZE)[0])[:, PREFIX:]
    np.testing.assert_allclose(out["tokens"].astype(np.float32), expected.numpy(), atol=2e-2)

    key = StoreKey("sha", "images", SIZE, 16, (side * side, WIDTH))
    store = FeatureStore.open(tmp_path / "store", key, rows=3)
    store.write(out["row"], out["descriptor"], out["tokens"], out["ok"])
    store.commit()
    candidates = np.array([[1, 2], [0, 2]])  # queries 0 and 1 against the other two
    scores = pair_scores(load_pair_classifier(checkpoint), store.tokens, store.tokens, candidates, (side, side),
                         progress=False)
    assert scores.shape == (2, 2) and np.isfinite(scores).all()
