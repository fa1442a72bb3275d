"""One evaluation: a checkpoint and a test set -> recall before and after re-ranking, and a report.

    summary = evaluate("model_epoch0003.pt", read_split(db_spec), read_split(q_spec, "queries"), out, EvalConfig())
    print(summary.report())

Steps, each checked before the next costs minutes:
  1. the checkpoint (and its pair classifier, if any) loads; K fits the database;
  2. database and queries are embedded by a Ray Data actor pool into feature stores under
     OUT/features/ (float32 descriptors + float16 patch tokens, memory-mapped; a re-run resumes);
  3. exact faiss search of every query among the database descriptors;
  4. the top K re-ranked by the pair classifier, both directions;
  5. Recall@N with positives within `radius_m` (or, where the queries carry `ground_truth`,
     the positives a file gives: evaluation/ground_truth.py), before and after, and of the raw-pixel
     baseline (16 x 16 thumbnails ranked by correlation, evaluation/baseline.py) the model must beat;
  6. OUT/report.json, OUT/predictions.parquet, OUT/rejects.parquet, OUT/report.html, OUT/recall.png.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from placeforge.catalog import REJECTS_SCHEMA, concat
from placeforge.config import to_dict
from placeforge.evaluation.baseline import BASELINE_NAME, rank_by_thumbnails
from placeforge.evaluation.dense_store import DONE, FeatureStore, StoreKey, bytes_per_image, images_sha256
from placeforge.evaluation.recall import correct_matrix, first_correct, positives_within, recall_at, recall_curve
from placeforge.evaluation.search import exact_search
from placeforge.evaluation.testset import GroundTruth, Split, check_comparable
from placeforge.fileio import OutputLockedError, file_sha256, output_lock, write_json_atomic, write_parquet_atomic

REPORT_FORMAT = 1


class EvaluationError(ValueError):
    """An evaluation that cannot start or finish; the message says what to change."""


@dataclass(frozen=True)
class EvalConfig:
    radius_m: float = field(default=25.0, metadata={"help": "a database image within this distance is right"})
    recall_at: tuple[int, ...] = field(default=(1, 5, 10, 20), metadata={"help": "N of the Recall@N reported"})
    rerank_top_k: int = field(default=100, metadata={"help": "global candidates re-ranked per query (0: none)"})
    rerank_global_weight: float | None = field(
        default=None, metadata={"help": "weight of the global cosine added to the pair classifier's re-ranking score "
                                        "(default: the model file's, 0 for Pair-VPR's score)"})
    batch_size: int = field(default=32, metadata={"help": "images per encoder batch"})
    embed_actors: int = field(default=0, metadata={"help": "encoder actors (0: one per GPU, else one per 2 CPUs)"})
    pairs_per_batch: int = field(default=256, metadata={"help": "pairs per pair-classifier call"})
    sample_queries: int = field(default=12, metadata={"help": "queries shown in report.html"})
    seed: int = field(default=0, metadata={"help": "seed of the report's query sample"})
    baseline: bool = field(default=True, metadata={"help": "also rank by 16x16 thumbnails: the raw-pixel baseline"})
    resize: str | None = field(default=None, metadata={
        "help": "crop, squash or short_side (aspect kept, no crop): how images are resized for the encoder "
                "(default: the checkpoint's)"})
    msls_submission: bool = field(default=False, metadata={
        "help": "also write OUT/msls_submission.txt: every query's key and its ranked database keys (re-ranked "
                "where a pair classifier is), the Mapillary SLS challenge's prediction format"})

    def validate(self) -> None:
        if not self.radius_m > 0:
            raise EvaluationError(f"radius_m must be > 0, got {self.radius_m}")
        if not self.recall_at or min(self.recall_at) < 1:
            raise EvaluationError(f"recall_at must be N >= 1, got {self.recall_at}")
        for name in ("batch_size", "pairs_per_batch"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rerank_top_k", "embed_actors", "sample_queries"):
            if getattr(self, name) < 0:
                raise EvaluationError(f"{name} must be >= 0, got {getattr(self, name)}")
        from placeforge.models.encoders import RESIZES  # here, not at import: torch is slow to load for --help

        if self.resize is not None and self.resize not in RESIZES:
            raise EvaluationError(f"resize must be one of {list(RESIZES)} (or unset: the checkpoint's), "
                                  f"got {self.resize!r}")


@dataclass(frozen=True)
class EvalSummary:
    out: Path
    report: dict

    def recall(self, kind: str = "global") -> dict[int, float] | None:
        """Recall@N of "global", "reranked" or "baseline" (raw pixels); None when not computed."""
        if kind == "baseline":
            values = (self.report.get("baseline") or {}).get("recall")
        else:
            values = self.report["recall"][kind]
        return None if values is None else {int(n): r for n, r in values.items()}

    def text(self) -> str:
        r, c = self.report, self.report["counts"]
        lines = [f"evaluated {c['queries']} queries against {c['database']} database images "
                 f"({c['rejected']} image(s) set aside, see rejects.parquet)"]
        if r.get("ground_truth"):
            lines.append(f"right answers: {r['ground_truth']['positives']}; {c['queries_with_positive']} of "
                         f"{c['queries']} queries have one")
        for kind, title in (("global", "global descriptor"), ("reranked", f"re-ranked top {r['rerank']['top_k']}")):
            if r["recall"][kind] is not None:
                lines.append(f"{title:>24}: " + "  ".join(f"R@{n} {100 * v:5.1f}" for n, v in r["recall"][kind].items()))
        if r.get("baseline"):
            lines.append(f"{'raw-pixel baseline':>24}: "
                         + "  ".join(f"R@{n} {100 * v:5.1f}" for n, v in r["baseline"]["recall"].items()))
        lines.append(r["rerank"]["note"])
        if r.get("baseline"):
            lines.append(r["baseline"]["note"])
        lines.append(f"report: {self.out / 'report.html'}")
        return "\n".join(lines)


def evaluate(checkpoint: str | os.PathLike, database: Split, queries: Split, out: str | os.PathLike,
             cfg: EvalConfig, ray_address: str | None = None, num_cpus: int | None = None,
             title: str | None = None, actor_resources: dict[str, float] | None = None) -> EvalSummary:
    """Run the whole evaluation; see the module docstring.  Writes only under `out`, and only
    while holding its lock (one evaluation per output folder).

    `actor_resources`: custom Ray resources each encoder actor asks for (e.g. placeforge_gpu_node).
    """
    with contextlib.ExitStack() as held:  # the lock on `out`, taken once the inputs are checked
        return _evaluate(checkpoint, database, queries, out, cfg, ray_address, num_cpus, title, actor_resources,
                         held)


def _evaluate(checkpoint, database, queries, out, cfg, ray_address, num_cpus, title, actor_resources,
              held: contextlib.ExitStack) -> EvalSummary:
    from placeforge.evaluation.embed import split_input_hw
    from placeforge.models.checkpoint import inspect_model_checkpoint, load_pair_classifier
    from placeforge.models.encoders import encoder_spec
    from placeforge.raysession import ray_session

    cfg.validate()
    check_comparable(database, queries)  # mock coordinates against UTM positions: no answer could be right
    ground_truth = _check_ground_truth(database, queries)
    started = time.perf_counter()
    checkpoint = Path(checkpoint).resolve()
    out = Path(out).resolve()
    encoder_cfg = inspect_model_checkpoint(checkpoint)  # a wrong file fails here, before any work
    pair = load_pair_classifier(checkpoint) if cfg.rerank_top_k else None
    if pair is not None and cfg.rerank_global_weight is not None:
        pair.global_weight = cfg.rerank_global_weight  # the command line's choice over the model file's
    labelled = ground_truth is not None or (database.east_north is not None and queries.east_north is not None)
    spec = encoder_spec(encoder_cfg.name)
    resize = cfg.resize or encoder_cfg.resize
    input_hw = {split.name: split_input_hw(split.paths, encoder_cfg.image_size, resize, spec.patch_size)
                for split in (database, queries)}  # (H, W) pixels: one size per split
    grids = {name: (h // spec.patch_size, w // spec.patch_size) for name, (h, w) in input_hw.items()}  # (gh, gw)
    top_k = min(cfg.rerank_top_k, len(database)) if pair is not None else 0
    notes = [_rerank_note(cfg, pair is not None, len(database))]
    try:
        held.enter_context(output_lock(out, "evaluate"))
    except OutputLockedError as err:
        raise EvaluationError(str(err)) from None

    sha = file_sha256(checkpoint)
    stores = {}
    for split in (database, queries):
        gh, gw = grids[split.name]
        tokens_shape = (gh * gw, spec.embed_dim) if pair is not None else None
        key = StoreKey(sha, images_sha256(split.paths), encoder_cfg.image_size, encoder_cfg.descriptor_dim,
                       tokens_shape, resize=resize, input_hw=input_hw[split.name])
        stores[split.name] = FeatureStore.open(out / "features" / split.name, key, len(split))
    timings: dict[str, float] = {}
    with ray_session(ray_address, num_cpus):
        import ray

        from placeforge.evaluation.embed import embed_split

        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        actors = cfg.embed_actors or (gpus if gpus else max(1, cpus // 2))
        embedded_now = {}  # rows computed by this run (a resumed run computes only the missing ones)
        for split in (database, queries):
            tick = time.perf_counter()
            embedded_now[split.name] = embed_split(stores[split.name], split.paths, str(checkpoint), cfg.batch_size,
                                                   actors, split.name, resize, input_hw[split.name],
                                                   actor_resources=actor_resources)
            timings[f"embed_{split.name}"] = time.perf_counter() - tick

    db_store, q_store = stores[database.name], stores[queries.name]
    db_rows = np.flatnonzero(db_store.done == DONE)
    q_rows = np.flatnonzero(q_store.done == DONE)
    if len(db_rows) == 0 or len(q_rows) == 0:
        raise EvaluationError(f"no decodable images: {len(db_rows)} database, {len(q_rows)} queries")
    k = min(max(max(cfg.recall_at), top_k), len(db_rows))
    tick = time.perf_counter()
    scores, local = exact_search(db_store.descriptors[db_rows], q_store.descriptors[q_rows], k)
    candidates = db_rows[local]  # [Q, k] indices into database.paths
    timings["search"] = time.perf_counter() - tick

    reranked = rerank_scores = None
    if pair is not None:
        from placeforge.evaluation.rerank import pair_scores, rerank_order

        top_k = min(top_k, k)
        tick = time.perf_counter()
        rerank_scores = pair_scores(pair, q_store.tokens, db_store.tokens, candidates[:, :top_k],
                                    grids[queries.name], cfg.pairs_per_batch, query_rows=q_rows,
                                    db_grid=grids[database.name], global_scores=scores[:, :top_k])
        timings["rerank"] = time.perf_counter() - tick
        order, top = rerank_order(candidates[:, :top_k], rerank_scores)
        reranked = np.concatenate([top, candidates[:, top_k:]], axis=1)  # below K: the global order
        rerank_scores = np.pad(np.take_along_axis(rerank_scores, order, axis=1), ((0, 0), (0, k - top_k)),
                               constant_values=np.nan)  # [Q, k]: NaN where not re-ranked

    recall = {"global": None, "reranked": None}
    curves = {"global": None, "reranked": None}
    correct = {"global": None, "reranked": None}
    with_positive = baseline = None
    if labelled:
        if ground_truth is not None:  # [Q] rows of database.paths, as the file gives them
            positives = [ground_truth.positives[i] for i in q_rows]
        else:
            positives = positives_within(database.east_north, database.zone, queries.east_north[q_rows],
                                         queries.zone[q_rows], cfg.radius_m)
        with_positive = np.array([len(p) > 0 for p in positives])
        if ground_truth is not None:
            notes.append(_ground_truth_note(ground_truth, int((~with_positive).sum())))
        for kind, ranked in (("global", candidates), ("reranked", reranked)):
            if ranked is not None:
                correct[kind], recall[kind], curves[kind] = _score(ranked, positives, cfg.recall_at)
        if reranked is not None:
            notes.append(_effect_note(recall, top_k))
        if cfg.baseline:  # the same queries, database images and positives as the model's
            tick = time.perf_counter()
            local, unreadable = rank_by_thumbnails([database.paths[i] for i in db_rows],
                                                   [queries.paths[i] for i in q_rows], k)
            ranked = np.where(local >= 0, db_rows[local], -1)  # [Q, k] into database.paths; -1: none
            _, base_recall, base_curve = _score(ranked, positives, cfg.recall_at)
            timings["baseline"] = time.perf_counter() - tick
            baseline = {"name": BASELINE_NAME, "recall": base_recall, "recall_curve": base_curve,
                        "unreadable": unreadable, "note": _baseline_note(recall["global"], base_recall)}
    else:
        notes.append("no positions (--no-labels): predictions written, no recall")

    rejects = _rejects(database, queries, db_store, q_store)
    timings["total"] = time.perf_counter() - started
    report = {
        "format": REPORT_FORMAT, "title": title or f"{checkpoint.name} on {_test_set_name(database, queries)}",
        "checkpoint": str(checkpoint), "checkpoint_sha256": sha, "encoder": encoder_cfg.name,
        "image_size": encoder_cfg.image_size, "positive_radius_m": cfg.radius_m,
        "ground_truth": _ground_truth_report(ground_truth, cfg, labelled),
        "preprocessing": {"resize": resize, "chosen_by": "--resize" if cfg.resize else "checkpoint",
                          "image_size": encoder_cfg.image_size,
                          "input_hw": {name: list(hw) for name, hw in input_hw.items()}},
        "positions": {split.name: split.frame for split in (database, queries)}, "config": to_dict(cfg),
        "counts": {"database": int(len(db_rows)), "queries": int(len(q_rows)),
                   "queries_with_positive": None if with_positive is None else int(with_positive.sum()),
                   "rejected": rejects.num_rows, "embedded_now": embedded_now},
        "recall": recall, "recall_curve": curves, "baseline": baseline,
        "rerank": {"available": pair is not None, "top_k": top_k, "note": " ".join(n for n in notes if n),
                   "global_weight": None if pair is None else pair.global_weight},
        "feature_store": {"bytes_per_database_image": bytes_per_image(db_store.key),
                          "folder": str(db_store.folder)},
        "timings_s": {name: round(value, 3) for name, value in timings.items()},
        "throughput": _throughput(timings, len(q_rows), top_k),
    }
    if ground_truth is not None:
        del report["positive_radius_m"]  # a file's positives have no radius; "ground_truth" names the file
    if cfg.msls_submission:
        from placeforge.evaluation.msls_submission import MIN_PREDICTIONS, write_msls_submission

        ranked_all = np.full((len(queries), k), -1, dtype=np.int64)  # an unreadable query: its key alone
        ranked_all[q_rows] = candidates if reranked is None else reranked
        write_msls_submission(out / "msls_submission.txt", queries.paths, database.paths, ranked_all)
        if k < MIN_PREDICTIONS:
            notes.append(f"msls_submission.txt holds {k} predictions per query; the challenge scores up to "
                         f"{MIN_PREDICTIONS}")
        report["msls_submission"] = {"file": "msls_submission.txt", "predictions_per_query": int(k),
                                     "ranking": "global" if reranked is None else "reranked"}
        report["rerank"]["note"] = " ".join(n for n in notes if n)
    predictions = _predictions(queries, q_rows, candidates, scores, correct, reranked, rerank_scores, with_positive)
    write_parquet_atomic(predictions, out / "predictions.parquet")
    write_parquet_atomic(rejects, out / "rejects.parquet")
    write_json_atomic(out / "report.json", report)
    from placeforge.evaluation.report import write_report

    write_report(out, report, predictions, database.paths, sample_queries=cfg.sample_queries, seed=cfg.seed)
    return EvalSummary(out, report)


def _check_ground_truth(database: Split, queries: Split) -> GroundTruth | None:
    """The queries' ground truth, checked to index this database; None when positives come from positions."""
    if database.ground_truth is not None:
        raise EvaluationError("the database carries ground truth; it belongs to the queries (positives per query)")
    truth = queries.ground_truth
    if truth is None:
        return None
    if len(truth.positives) != len(queries):
        raise EvaluationError(f"the ground truth of {truth.source} has {len(truth.positives)} rows for "
                              f"{len(queries)} queries")
    if truth.database_paths != database.paths:
        raise EvaluationError(f"the ground truth of {truth.source} indexes another database "
                              f"({len(truth.database_paths)} images) than the one given ({len(database)}); "
                              "read both from the same lists")
    return truth


def _ground_truth_report(truth: GroundTruth | None, cfg: EvalConfig, labelled: bool) -> dict | None:
    """report.json's account of which database images count as right; None without labels."""
    if not labelled:
        return None
    if truth is None:
        return {"kind": "radius", "positives": f"database images within {cfg.radius_m:g} m", "radius_m": cfg.radius_m}
    return {"kind": "file", "positives": f"from {truth.source}", "file": truth.source,
            "positives_set_aside": truth.positives_set_aside}


def _ground_truth_note(truth: GroundTruth, without_positive: int) -> str:
    note = f"right answers from {Path(truth.source).name}, not a radius."
    if truth.positives_set_aside:
        note += f" {truth.positives_set_aside} listed positive(s) dropped: their database image is set aside."
    if without_positive:
        note += (f" {without_positive} query(ies) have no positive in the database: misses at every N, as in "
                 "GSV-Cities' recall.")
    return note


def _test_set_name(database: Split, queries: Split) -> str:
    """The folder both splits live in (e.g. "test" for test/database + test/queries)."""
    common = Path(os.path.commonpath([database.paths[0], queries.paths[0]]))
    return common.name or str(common)


def _rerank_note(cfg: EvalConfig, has_pair: bool, database_size: int) -> str:
    if cfg.rerank_top_k == 0:
        return "re-ranking off (rerank_top_k 0): global recall only."
    if not has_pair:
        return "the checkpoint has no pair classifier (not a stage-2 export): global recall only."
    if cfg.rerank_top_k > database_size:
        return f"rerank_top_k {cfg.rerank_top_k} > database size {database_size}: every database image re-ranked."
    return ""


def _score(ranked: np.ndarray, positives: list[np.ndarray], ns: tuple[int, ...]
           ) -> tuple[np.ndarray, dict[str, float], list[float]]:
    """[Q, k] candidate indices, best first -> [Q, k] right or not, {"N": Recall@N}, the recall curve."""
    correct = correct_matrix(ranked, positives)
    first = first_correct(correct)
    return correct, {str(n): r for n, r in recall_at(first, ns).items()}, recall_curve(first, ranked.shape[1])


def _baseline_note(model: dict[str, float], baseline: dict[str, float]) -> str:
    """Whether the global descriptor beats raw pixels, at the smallest N reported."""
    n = min(model, key=int)
    gap = 100 * (model[n] - baseline[n])
    if gap > 0:
        verdict = f"beats raw pixels by {gap:.1f} points"
    elif gap < 0:
        verdict = f"does NOT beat raw pixels ({-gap:.1f} points behind)"
    else:
        verdict = "only ties raw pixels"
    return (f"global descriptor Recall@{n} {100 * model[n]:.1f}% vs raw-pixel baseline {100 * baseline[n]:.1f}%: "
            f"the model {verdict}.")


def _effect_note(recall: dict, top_k: int) -> str:
    before, after = recall["global"]["1"], recall["reranked"]["1"]
    if after > before:
        return f"re-ranking the top {top_k} raised Recall@1 by {100 * (after - before):.1f} points."
    if after == before:
        return f"re-ranking the top {top_k} left Recall@1 unchanged."
    return f"re-ranking the top {top_k} LOWERED Recall@1 by {100 * (before - after):.1f} points."


def _throughput(timings: dict[str, float], queries: int, top_k: int) -> dict[str, float | None]:
    search = timings["search"] + timings.get("embed_queries", 0.0)
    return {"queries_per_s_global": round(queries / search, 2) if search > 0 else None,
            "pairs_per_s_rerank": round(queries * top_k / timings["rerank"], 2) if timings.get("rerank") else None}


def _rejects(database: Split, queries: Split, db_store: FeatureStore, q_store: FeatureStore) -> pa.Table:
    tables = [s.rejects for s in (database, queries) if s.rejects is not None and s.rejects.num_rows]
    for split, store in ((database, db_store), (queries, q_store)):
        failed = store.failed()
        if len(failed):
            tables.append(pa.table({
                "input": [split.paths[i] for i in failed], "source": ["evaluate"] * len(failed),
                "dataset": [split.name] * len(failed), "stage": ["encode"] * len(failed),
                "reason": ["decode_error"] * len(failed),
                "detail": ["the image could not be decoded; left out of the evaluation"] * len(failed),
                "image_id": pa.nulls(len(failed), pa.int64()),
            }, schema=REJECTS_SCHEMA))
    return concat(tables, REJECTS_SCHEMA)


def _predictions(queries: Split, q_rows: np.ndarray, candidates: np.ndarray, scores: np.ndarray, correct: dict,
                 reranked: np.ndarray | None, rerank_scores: np.ndarray | None,
                 with_positive: np.ndarray | None) -> pa.Table:
    """One row per evaluated query; list columns best first (report.py reads this contract)."""
    n = len(q_rows)

    def lists(values: np.ndarray | None, tp: pa.DataType) -> pa.Array:
        if values is None:
            return pa.nulls(n, pa.list_(tp))
        return pa.array(list(values), type=pa.list_(tp))

    return pa.table({
        "query_index": pa.array(q_rows, pa.int32()),
        "query_path": [queries.paths[i] for i in q_rows],
        "has_positive": pa.nulls(n, pa.bool_()) if with_positive is None else pa.array(with_positive),
        "global_candidates": lists(candidates.astype(np.int32), pa.int32()),
        "global_scores": lists(scores, pa.float32()),
        "global_correct": lists(correct["global"], pa.bool_()),
        "reranked_candidates": lists(None if reranked is None else reranked.astype(np.int32), pa.int32()),
        "rerank_scores": lists(rerank_scores, pa.float32()),
        "reranked_correct": lists(correct["reranked"], pa.bool_()),
    })



