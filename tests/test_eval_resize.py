"""The "short_side" resize (VPR-methods-evaluation: short side to S, aspect kept, no crop) and
evaluation's --resize, without Ray: sizes as pure functions, the embedding actor called in
process, and `evaluate` with the Ray job swapped for that in-process actor.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import placeforge.raysession
from placeforge.evaluation import embed as evaluation_embed
from placeforge.evaluation.dense_store import FeatureStore, StoreKey
from placeforge.evaluation.embed import split_input_hw
from placeforge.evaluation.job import EvalConfig, EvaluationError, evaluate
from placeforge.evaluation.rerank import pair_scores
from placeforge.evaluation.testset import read_split
from placeforge.models.checkpoint import load_pair_classifier, save_model_checkpoint
from placeforge.models.decoder import SiameseMIMDecoder, decoder_config
from placeforge.models.embedding import Embedder
from placeforge.models.encoders import (
    EncoderConfig,
    build_model,
    decode_images,
    imagenet_normalize,
    resize_and_crop,
    short_side_hw,
    to_unit_tensor,
)
from placeforge.models.heads import PairClassifier

SIZE, PATCH = 28, 14  # vit_tiny_test


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize(("width", "height", "expected_hw"), [
    (640, 480, (322, 434)),  # 4:3 -> 429.3 px wide -> 31 patches of 14 (30.67 rounds up)
    (480, 640, (434, 322)),  # 3:4: the same, standing
    (512, 512, (322, 322)),
    (1280, 720, (322, 574)),  # 16:9 -> 572.4 -> 41 patches
])
def test_short_side_keeps_the_aspect_and_rounds_the_long_side_to_a_patch(width, height, expected_hw):
    assert short_side_hw(width, height, 322, 14) == expected_hw


def test_short_side_never_makes_the_long_side_less_than_one_patch():
    assert short_side_hw(10, 10, 14, 14) == (14, 14)
    assert short_side_hw(11, 10, 14, 14) == (14, 14)  # 15.4 px rounds to one patch, not two


@pytest.mark.parametrize(("width", "height"), [(112, 84), (84, 112)])
def test_short_side_output_is_the_whole_image_at_h_by_w(width, height):
    hw = short_side_hw(width, height, SIZE, PATCH)
    assert hw == ((28, 42) if width > height else (42, 28))
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 8))  # a white corner: cropping would lose it
    pixels = resize_and_crop(image, hw, "short_side")
    assert pixels.shape == (*hw, 3)
    assert pixels[0, 0].min() > 200
    batch, ok = decode_images([jpeg(image), None], hw, "short_side")
    assert batch.shape == (2, 3, *hw) and ok.tolist() == [True, False]


def test_decode_images_refuses_a_size_that_does_not_fit_the_resize():
    with pytest.raises(ValueError, match=r"short_side takes \(H, W\)"):
        decode_images([jpeg(photo(40, 30, 0))], SIZE, "short_side")
    with pytest.raises(ValueError, match="crop takes one side"):
        decode_images([jpeg(photo(40, 30, 0))], (28, 42), "crop")
    with pytest.raises(ValueError, match="resize must be one of"):
        decode_images([], SIZE, "stretch")


def test_split_input_hw_is_the_most_common_size(tmp_path):
    paths = []
    for i, size in enumerate([(112, 84)] * 5 + [(84, 112)] * 2):
        path = tmp_path / f"{i}.jpg"
        photo(*size, seed=i).save(path)
        paths.append(str(path))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.append(str(tmp_path / "bad.jpg"))
    assert split_input_hw(paths, SIZE, "short_side", PATCH) == (28, 42)
    assert split_input_hw(paths, SIZE, "squash", PATCH) == (28, 28)
    assert split_input_hw([str(tmp_path / "bad.jpg")], SIZE, "short_side", PATCH) == (28, 28)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = EncoderConfig(name="vit_tiny_test", image_size=SIZE, descriptor_dim=16)  # resize: crop
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, PATCH), hidden_dim=32)
    return save_model_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "m.pt", pair=pair,
                                 decoder="dec64d2b")


def test_short_side_embedding_sees_the_whole_image_and_reranks_across_grids(checkpoint, tmp_path):
    landscape = [photo(112, 84, seed) for seed in range(3)]  # database: 4:3 -> 28 x 42, grid 2 x 3
    portrait = [photo(84, 112, seed) for seed in range(3, 5)]  # queries: 3:4 -> 42 x 28, grid 3 x 2
    stores = {}
    for name, images, hw in (("db", landscape, (28, 42)), ("q", portrait, (42, 28))):
        paths = []
        for i, image in enumerate(images):
            paths.append(str(tmp_path / f"{name}{i}.jpg"))
            image.save(paths[-1], quality=95)
        embedder = Embedder(str(checkpoint), "row", True, "short_side", hw)
        out = embedder({"row": np.arange(len(paths)), "path": np.array(paths)})
        assert out["tokens"].shape == (len(paths), 6, 64) and out["ok"].all()
        # The actor's descriptor is the model's on the whole image resized to H x W (no crop).
        with Image.open(paths[0]) as image:
            pixels = np.array(resize_and_crop(image, hw, "short_side"))[None]  # [1, H, W, 3]
        with torch.inference_mode():
            expected = embedder.model(imagenet_normalize(to_unit_tensor(pixels)))[0].numpy()
        np.testing.assert_allclose(out["descriptor"][0].astype(np.float32), expected, atol=2e-3)
        store = FeatureStore.open(tmp_path / name, StoreKey("sha", name, SIZE, 16, (6, 64), resize="short_side",
                                                            input_hw=hw), rows=len(paths))
        store.write(out["row"], out["descriptor"], out["tokens"], out["ok"])
        store.commit()
        stores[name] = store
    pair = load_pair_classifier(checkpoint).eval()
    candidates = np.array([[0, 1, 2], [2, 0, 1]])
    scores = pair_scores(pair, stores["q"].tokens, stores["db"].tokens, candidates, (3, 2), progress=False,
                         db_grid=(2, 3))
    assert scores.shape == (2, 3) and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="image A has 6 tokens, its grid"):  # a wrong grid is caught, not used
        pair_scores(pair, stores["q"].tokens, stores["db"].tokens, candidates, (3, 3), progress=False)


def name_at(east: float) -> str:
    return f"@{500000 + east:010.2f}@4180000.00@10@S@@@p@@@@@@@@.jpg"


def in_process_embed_split(store, paths, checkpoint, batch_size, actors, label, resize, input_hw,
                           actor_resources=None):
    """evaluation.embed.embed_split with the actor called here instead of in a Ray pool."""
    pending = store.pending()
    embedder = Embedder(checkpoint, "row", store.tokens is not None, resize, input_hw)
    for start in range(0, len(pending), batch_size):
        rows = pending[start:start + batch_size]
        out = embedder({"row": rows, "path": np.array([paths[i] for i in rows])})
        store.write(out["row"], out["descriptor"], out.get("tokens"), out["ok"])
    store.commit()
    return len(pending)


@pytest.mark.parametrize("resize", [None, "short_side"])
def test_evaluate_records_the_resize_it_used(checkpoint, tmp_path, monkeypatch, resize):
    import ray

    monkeypatch.setattr(placeforge.raysession, "ray_session", lambda *args: contextlib.nullcontext())
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1})
    monkeypatch.setattr(evaluation_embed, "embed_split", in_process_embed_split)
    for folder, offsets, size in (("database", (0, 100, 200), (112, 84)), ("queries", (3, 198), (84, 112))):
        (tmp_path / folder).mkdir()
        for i, east in enumerate(offsets):
            photo(*size, seed=i).save(tmp_path / folder / name_at(east), quality=95)
    db, queries = (read_split(f"atname:{tmp_path / f}", f) for f in ("database", "queries"))
    cfg = EvalConfig(rerank_top_k=2, recall_at=(1, 2), baseline=False, batch_size=2, resize=resize)
    summary = evaluate(checkpoint, db, queries, tmp_path / "out", cfg)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    expected = ({"resize": "crop", "chosen_by": "checkpoint", "image_size": SIZE,
                 "input_hw": {"database": [28, 28], "queries": [28, 28]}} if resize is None else
                {"resize": "short_side", "chosen_by": "--resize", "image_size": SIZE,
                 "input_hw": {"database": [28, 42], "queries": [42, 28]}})
    assert report["preprocessing"] == expected
    assert report["config"]["resize"] == resize
    assert summary.recall("reranked") is not None  # re-ranking ran on the (non-square) grids
    stored = json.loads((tmp_path / "out" / "features" / "queries" / "store.json").read_text())
    assert stored["resize"] == expected["resize"] and stored["input_hw"] == expected["input_hw"]["queries"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"{expected['resize']} at {SIZE} px (from {expected['chosen_by']})" in html


def test_an_unknown_resize_is_refused_with_the_valid_ones():
    with pytest.raises(EvaluationError, match=r"resize must be one of \['crop', 'squash', 'short_side'\]"):
        EvalConfig(resize="stretch").validate()
