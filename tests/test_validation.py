"""Recall during training (trainer.validation): the protocol on a real split, and the trainer's
validation events, validation.json and best-epoch export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from placeforge.models.decoder import SiameseMIMDecoder, decoder_config
from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.models.heads import PairClassifier
from placeforge.trainer.validation import ValidationSplit, validate
from synthcity import generate
from synthcity.synth_config import SynthConfig
from tests.test_train import TINY, steps_of, train, write_shards, write_v0_labels

SPLIT = dataclasses.replace(SynthConfig.tiny(), train_places=2, test_places=2, queries=2, gsv_places=1, val_places=4,
                            val_queries=8, width=64, height=48, workers=1)


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_city")
    generate(root, SPLIT)
    return root / "atname" / "val"


def test_validation_follows_the_evaluation_protocol(city):
    same = ValidationSplit.open(f"atname:{city / 'database'}", f"atname:{city / 'database'}")
    torch.manual_seed(0)
    cfg = EncoderConfig("vit_tiny_test", 28, 16, "gem", input_norm="per_image", resize="squash")
    model = build_model(cfg)
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, 14))
    model.train()
    result = validate(model, pair, same, cfg.image_size, cfg.resize, torch.device("cpu"), rerank_top_k=5)
    assert result["val_r1"] == 100.0  # every query is a database image: its own twin is first
    assert 0.0 <= result["val_reranked_r1"] <= result["val_reranked_r5"] <= 100.0
    assert model.training and pair.training  # modes restored
    split = ValidationSplit.open(f"atname:{city / 'database'}", f"atname:{city / 'queries'}", radius_m=25.0)
    assert len(split.queries) == 8 and all(len(p) > 0 for p in split.positives)  # each query has a place near
    assert "val_reranked_r1" not in validate(model, None, split, 28, "squash", torch.device("cpu"))


def test_validation_keeps_the_aspect_ratio_with_short_side(city):
    same = ValidationSplit.open(f"atname:{city / 'database'}", f"atname:{city / 'database'}")
    torch.manual_seed(0)
    model = build_model(EncoderConfig("vit_tiny_test", 28, 16, "gem", resize="short_side"))
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, 14), aligned=True)  # 64 x 48 images:
    result = validate(model, pair, same, 28, "short_side", torch.device("cpu"), rerank_top_k=5)  # a 2 x 3 grid
    assert result["val_r1"] == 100.0
    assert result["val_reranked_r1"] == 100.0  # aligned similarity 1 with its own twin: first after re-ranking


@pytest.mark.slow
def test_training_writes_validation_events_and_the_best_model(city, tmp_path):
    ids = write_shards(tmp_path / "shards", [[(s * 6 + p, 4) for p in range(6)] for s in range(4)])  # 24 places x 4
    write_v0_labels(tmp_path / "labels", ids)
    data = {"shards": tmp_path / "shards", "labels": tmp_path / "labels"}
    out = tmp_path / "fine"
    result = train(["--stage", "finetune", "--shards", str(data["shards"]), "--labels", str(data["labels"]),
                    "--out", str(out), "--batch.places-per-batch", "4", "--batch.images-per-place", "4", "--epochs", "2", *TINY,
                    "--validation.database", f"atname:{city / 'database'}", "--validation.queries", f"atname:{city / 'queries'}",
                    "--validation.rerank-top-k", "4"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [e for e in events if e.get("event") == "validation"]
    assert [v["epoch"] for v in vals] == [0, 1] and all("val_reranked_r1" in v for v in vals)
    assert len(steps_of(out)) >= 2
    summary = json.loads((out / "export" / "validation.json").read_text())
    best = summary["best"]
    assert best["val_r1"] == max(v["val_r1"] for v in vals)
    assert (out / "export" / "best_model.pt").read_bytes() == (out / "export" / best["model"]).read_bytes()
    assert "validation Recall@1 / @5 by epoch" in result.stdout and f"best epoch {best['epoch']}" in result.stdout
    assert np.isfinite([v["val_r5"] for v in vals]).all()
