"""pipelines/evaluate.py on a real local Ray: the tiny synthetic test split, a tiny checkpoint.

The recall in report.json (the model's and the raw-pixel baseline's) is recomputed here
from the stored descriptors / the thumbnails with a plain implementation; predictions,
rejects and the report files are read back.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from placeforge.evaluation.baseline import describe_files
from placeforge.evaluation.testset import read_split
from placeforge.fileio import LOCK_FILE, output_lock
from placeforge.models.checkpoint import save_model_checkpoint
from placeforge.models.decoder import SiameseMIMDecoder, decoder_config
from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.models.heads import PairClassifier
from placeforge.pipelines.evaluate import main
from synthcity import generate
from synthcity.synth_config import SynthConfig
from tests.test_eval_core import plain_recall

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    city = tmp_path_factory.mktemp("city")
    generate(city, SynthConfig.tiny(), progress=False)
    return city / "atname" / "test"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = EncoderConfig(name="vit_tiny_test", image_size=56, descriptor_dim=32)
    model = build_model(cfg)
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, 14), hidden_dim=32)
    return (save_model_checkpoint(model, cfg, folder / "with_pair.pt", pair=pair, decoder="dec64d2b"),
            save_model_checkpoint(model, cfg, folder / "global_only.pt"))


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_recall_before_and_after_reranking_matches_a_plain_recomputation(local_ray, test_set, checkpoints,
                                                                        tmp_path, capsys):
    out = tmp_path / "eval"
    code, printed, err = run(capsys, "--checkpoint", checkpoints[0], "--test-set", test_set, "--out", out,
                             "--rerank-top-k", 8, "--batch-size", 16)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    database, queries = read_split(str(test_set / "database")), read_split(str(test_set / "queries"), "queries")
    assert report["counts"]["database"] == len(database) == 32 and report["counts"]["queries"] == len(queries) == 24
    assert report["counts"]["embedded_now"] == {"database": 32, "queries": 24}
    db = np.load(out / "features" / "database" / "descriptors.npy").astype(np.float32)
    q = np.load(out / "features" / "queries" / "descriptors.npy").astype(np.float32)
    expected = plain_recall(db, q, database.east_north, queries.east_north, 25.0, (1, 5, 10, 20))
    assert {int(n): r for n, r in report["recall"]["global"].items()} == expected
    assert "R@1" in printed and "re-ranked top 8" in printed
    thumbs = [describe_files(split.paths, progress=False)[0] for split in (database, queries)]  # [M | Q, 768]
    baseline = plain_recall(*thumbs, database.east_north, queries.east_north, 25.0, (1, 5, 10, 20))
    assert report["baseline"]["name"] == "thumbnail 16x16 correlation" and report["baseline"]["unreadable"] == 0
    assert {int(n): r for n, r in report["baseline"]["recall"].items()} == baseline
    assert len(report["baseline"]["recall_curve"]) == len(report["recall_curve"]["global"])
    assert "raw-pixel baseline" in printed and "vs raw-pixel baseline" in printed

    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(predictions) == 24
    for row in predictions:
        top = row["reranked_candidates"][:8]
        assert sorted(top) == sorted(row["global_candidates"][:8])  # re-ranking permutes the top K only
        assert row["reranked_candidates"][8:] == row["global_candidates"][8:]
        assert row["rerank_scores"][:8] == sorted(row["rerank_scores"][:8], reverse=True)
    reranked_r1 = np.mean([row["reranked_correct"][0] for row in predictions])
    assert report["recall"]["reranked"]["1"] == pytest.approx(reranked_r1)
    assert (out / "report.html").stat().st_size > 0 and (out / "recall.png").stat().st_size > 0
    assert f"<td>{100 * baseline[1]:.1f}</td></tr><tr><td>5</td>" in (out / "report.html").read_text()  # last column
    assert pq.read_table(out / "rejects.parquet").num_rows == report["counts"]["rejected"] == 0

    # Resume: forget half the database rows; a re-run embeds only those and gets the same recall.
    done = np.load(out / "features" / "database" / "done.npy", mmap_mode="r+")
    done[:16] = 0
    done.flush()
    del done
    assert run(capsys, "--checkpoint", checkpoints[0], "--test-set", test_set, "--out", out,
               "--rerank-top-k", 8, "--batch-size", 16)[0] == 0
    again = json.loads((out / "report.json").read_text())
    assert again["counts"]["embedded_now"] == {"database": 16, "queries": 0}
    assert again["recall"] == report["recall"] and again["baseline"] == report["baseline"]


def test_checkpoint_without_pair_classifier_and_k_beyond_the_database(local_ray, test_set, checkpoints,
                                                                       tmp_path, capsys):
    code, printed, _ = run(capsys, "--checkpoint", checkpoints[1], "--test-set", test_set, "--out", tmp_path / "a",
                           "--baseline", "false")
    assert code == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["recall"]["reranked"] is None and "no pair classifier" in printed
    assert report["baseline"] is None and "raw-pixel" not in printed  # switched off
    assert not (tmp_path / "a" / "features" / "database" / "tokens.npy").exists()  # no dense store needed

    code, printed, _ = run(capsys, "--checkpoint", checkpoints[0], "--test-set", test_set, "--out", tmp_path / "b",
                           "--rerank-top-k", 500)
    assert code == 0 and "rerank_top_k 500 > database size 32" in printed
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["rerank"]["top_k"] == 32 and report["recall"]["reranked"] is not None


def test_names_without_coordinates_need_no_labels_and_bad_images_are_set_aside(local_ray, test_set, checkpoints,
                                                                                tmp_path, capsys):
    plain = tmp_path / "plain"
    for side in ("database", "queries"):
        (plain / side).mkdir(parents=True)
        for i, image in enumerate(sorted((test_set / side).iterdir())[:6]):
            shutil.copy(image, plain / side / f"img_{i}.jpg")
    (plain / "database" / "broken.jpg").write_bytes(b"not a jpeg")
    code, _, err = run(capsys, "--checkpoint", checkpoints[0], "--test-set", plain, "--out", tmp_path / "x")
    assert code == 2 and "no usable images" in err  # @-names are required for recall
    code, printed, err = run(capsys, "--checkpoint", checkpoints[0], "--test-set", plain, "--out", tmp_path / "y",
                             "--no-labels", "--rerank-top-k", 3, "--msls-submission", "true")
    assert code == 0, err
    rows = [line.split() for line in (tmp_path / "y" / "msls_submission.txt").read_text().splitlines()
            if not line.startswith("#")]
    assert [r[0] for r in rows] == [f"img_{i}" for i in range(6)]  # every query, by key
    assert all(len(r) == 1 + 6 and sorted(r[1:]) == [f"img_{i}" for i in range(6)] for r in rows)  # all 6 ranked
    submission = json.loads((tmp_path / "y" / "report.json").read_text())["msls_submission"]
    assert submission == {"file": "msls_submission.txt", "predictions_per_query": 6, "ranking": "reranked"}
    report = json.loads((tmp_path / "y" / "report.json").read_text())
    assert report["recall"] == {"global": None, "reranked": None} and report["counts"]["database"] == 6
    assert report["baseline"] is None  # no positions, no recall to compare
    rejects = pq.read_table(tmp_path / "y" / "rejects.parquet").to_pylist()
    assert [(r["reason"], r["input"].endswith("broken.jpg")) for r in rejects] == [("decode_error", True)]
    assert "predictions only, no recall" in (tmp_path / "y" / "report.html").read_text()
    predictions = pq.read_table(tmp_path / "y" / "predictions.parquet")
    assert predictions.num_rows == 6 and predictions.column("global_correct").null_count == 6


def test_empty_database_and_missing_checkpoint_fail_before_any_work(test_set, checkpoints, tmp_path, capsys):
    (tmp_path / "empty" / "database").mkdir(parents=True)
    (tmp_path / "empty" / "queries").mkdir()
    code, _, err = run(capsys, "--checkpoint", checkpoints[0], "--test-set", tmp_path / "empty", "--out", tmp_path / "o")
    assert code == 2 and "evaluate: error:" in err and "database" in err
    code, _, err = run(capsys, "--checkpoint", tmp_path / "nope.pt", "--test-set", test_set, "--out", tmp_path / "o")
    assert code == 2 and "nope.pt" in err
    assert not (tmp_path / "o").exists()  # nothing written for a run that could not start


def test_a_second_evaluation_into_the_same_out_is_refused(test_set, checkpoints, tmp_path, capsys):
    out = tmp_path / "busy"
    with output_lock(out, "evaluate"):
        code, _, err = run(capsys, "--checkpoint", checkpoints[0], "--test-set", test_set, "--out", out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # refused before any feature was stored
    assert code == 2 and "is being written by evaluate (host" in err
