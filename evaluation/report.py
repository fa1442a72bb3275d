"""The report a person looks at: report.html + recall.png + thumbs/, in one movable folder.

    paths = write_report(out_dir, report, predictions, database_paths, sample_queries=12, seed=0)
    paths["html"]   # out_dir/report.html: recall table, note, counts, timings, sampled queries
    paths["png"]    # out_dir/recall.png: Recall@N (%) against N, global and (when run) re-ranked,
                    # and the raw-pixel baseline (dashed grey) the model must beat

`report` is the dict also saved as report.json; `predictions` has one row per query
(global_candidates / global_scores / global_correct and, when re-ranking ran,
reranked_candidates / rerank_scores / reranked_correct, null otherwise).  `report["baseline"]`,
when not None, holds the raw-pixel baseline's recall and recall_curve (evaluation/baseline.py).

The page is static: no JavaScript, no network, its CSS inside the page, links relative
(`thumbs/q00012.jpg`) so the folder can be zipped or moved.  Text from data (paths,
checkpoint, note, title) is HTML-escaped.  Thumbnails are named by index only, never by a
dataset file name, so nothing is written outside `out_dir`.  Every file is written to a
temporary name beside it and then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from PIL import Image

from placeforge.fileio import atomic_write

TOP_SHOWN = 5  # candidates shown per ranking
PLACEHOLDER_GREY = (128, 128, 128)
RIGHT_MARK, WRONG_MARK = "\u2713", "\u2717"  # ✓ ✗
CURVE_TICKS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
BASELINE_LABEL = "raw-pixel baseline"

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
td.text, th.text { text-align: left; }
table.samples td { text-align: left; }
figure { display: inline-block; margin: 2px; text-align: center; font-size: 11px; }
figure img { display: block; margin: auto; border: 4px solid #999; }
figure.right img { border-color: #1a9641; }
figure.wrong img { border-color: #d7191c; }
figure.right figcaption { color: #1a9641; }
figure.wrong figcaption { color: #d7191c; }
.note { background: #f4f4f4; padding: 0.5em; }
"""


def pick_sample(global_top1_correct: np.ndarray, has_positive: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded sample of `count` query rows, about half of them global top-1 misses.

    Misses of queries that have a positive are the ones re-ranking could fix, so they
    fill half the sample; hits fill the other half.  Queries with no positive (misses by
    construction, least telling) come last.  A group that runs short is filled from the others.

    Args:
        global_top1_correct: [Q] bool, the global top-1 candidate is right.
        has_positive: [Q] bool, some database image lies within the positive radius.
    Returns:
        [S] int64 row positions, ascending, S = min(count, Q).
    """
    hit = np.asarray(global_top1_correct, dtype=bool)
    positive = np.asarray(has_positive, dtype=bool)
    rng = np.random.default_rng(seed)
    misses = rng.permutation(np.flatnonzero(~hit & positive))
    hits = rng.permutation(np.flatnonzero(hit))
    rest = rng.permutation(np.flatnonzero(~hit & ~positive))
    count = max(0, min(count, len(hit)))
    n_miss = min(len(misses), (count + 1) // 2)
    n_hit = min(len(hits), count - n_miss)
    order = np.concatenate([misses[:n_miss], hits[:n_hit], misses[n_miss:], hits[n_hit:], rest])
    return np.sort(order[:count]).astype(np.int64)


def recall_rows(recall: dict[str, Any]) -> list[tuple[int, float, float | None]]:
    """`report["recall"]` as [(N, global %, re-ranked % or None)], ascending N."""
    reranked = recall.get("reranked")
    rows = []
    for key in sorted(recall["global"], key=int):
        after = None if reranked is None or key not in reranked else 100.0 * float(reranked[key])
        rows.append((int(key), 100.0 * float(recall["global"][key]), after))
    return rows


def recall_figure(curve_global: Sequence[float], curve_reranked: Sequence[float] | None, title: str,
                  curve_baseline: Sequence[float] | None = None) -> Figure:
    """Recall@N (%) against N on a log axis.  Curves: [K] fractions, entry i is recall at N = i + 1.

    The raw-pixel baseline, when given, is a dashed grey line without markers: a floor, not a rival.
    """
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    longest = 1
    styles = {"marker": ".", "markersize": 4}
    for label, curve, style in (("global descriptor", curve_global, styles), ("re-ranked", curve_reranked, styles),
                                (f"{BASELINE_LABEL} (16x16 thumbnails)", curve_baseline,
                                 {"linestyle": "--", "color": "grey"})):
        if curve:
            n = np.arange(1, len(curve) + 1)
            ax.plot(n, 100.0 * np.asarray(curve, dtype=np.float64), label=label, **style)
            longest = max(longest, len(curve))
    ax.set_xscale("log")
    ax.set_xlim(1, max(2, longest))  # explicit: an empty or 1-point curve would leave a log axis at 0
    ticks = [t for t in CURVE_TICKS if t <= max(2, longest)]
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())  # log axes label minor ticks on short ranges
    ax.set_ylim(0, 100)
    ax.set_xlabel("N (candidates)")
    ax.set_ylabel("Recall@N (%)")
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    ax.set_title(title, fontsize=9, parse_math=False)  # a "$" in a run title is not mathtext
    return fig


def write_thumbnail(src: str, dst: Path, thumb_px: int) -> bool:
    """JPEG of `src` with longest side `thumb_px` at `dst`; a grey square if `src` cannot be read.

    Returns True when the image was read, False when the placeholder was written.
    """
    image = _read_thumbnail(src, thumb_px)
    ok = image is not None
    tile = image if image is not None else Image.new("RGB", (thumb_px, thumb_px), PLACEHOLDER_GREY)
    atomic_write(dst, lambda tmp: tile.save(tmp, format="JPEG", quality=85))
    return ok


def write_report(out_dir: Path, report: dict[str, Any], predictions: pa.Table, database_paths: Sequence[str],
                 sample_queries: int = 12, seed: int = 0, thumb_px: int = 128) -> dict[str, Path]:
    """Write recall.png, thumbs/ and report.html into `out_dir`.

    Args:
        report: the report.json dict (recall, recall_curve, counts, checkpoint, rerank,
            positive_radius_m, preprocessing, timings_s, optional title).
        predictions: one row per query (see the module docstring); candidates index `database_paths`.
        sample_queries: how many queries the page shows, picked by `pick_sample` with `seed`.
        thumb_px: longest side of a thumbnail in pixels.
    Returns:
        {"html": out_dir/report.html, "png": out_dir/recall.png, or None without positions (--no-labels)}
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = str(report.get("title") or "Evaluation report")
    labelled = report["recall"].get("global") is not None  # False with --no-labels: no right or wrong
    baseline = report.get("baseline")  # None: not computed (--baseline false, or no positions)
    reranked = predictions.column("reranked_candidates").null_count < predictions.num_rows

    counts = report["counts"]
    png = out_dir / "recall.png"
    if labelled:
        curves = report["recall_curve"]
        fig = recall_figure(curves["global"], curves.get("reranked") if reranked else None,
                            f"{title}\n{counts['queries']} queries ({counts['queries_with_positive']} with a positive), "
                            f"{counts['database']} database images", baseline["recall_curve"] if baseline else None)
        atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))

    top1 = [bool(c[0]) if c else False for c in predictions.column("global_correct").to_pylist()]
    has_positive = [bool(p) for p in predictions.column("has_positive").to_pylist()]
    rows = pick_sample(np.array(top1, dtype=bool), np.array(has_positive, dtype=bool), sample_queries, seed)
    sample = predictions.take(pa.array(rows, type=pa.int64())).to_pylist()  # only S rows become Python objects
    thumbs = _Thumbs(out_dir / "thumbs", database_paths, thumb_px)
    sample_rows = [_sample_row(thumbs, row, reranked) for row in sample]

    page = _page(title, report, reranked, sample_rows, n_missed=sum(not top1[i] for i in rows), labelled=labelled)
    html_path = out_dir / "report.html"
    atomic_write(html_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return {"html": html_path, "png": png if labelled else None}


# --- I/O helpers -----------------------------------------------------------------------



def _read_thumbnail(src: str, thumb_px: int) -> Image.Image | None:
    # Dataset files are untrusted: a missing, truncated, non-image or enormous file costs one
    # grey tile, not the report.  isfile also keeps a FIFO or device path from blocking us.
    if not os.path.isfile(src):
        return None
    try:
        with Image.open(src) as image:
            image.draft("RGB", (thumb_px, thumb_px))  # JPEG: decode at reduced scale, much faster
            thumb = image.convert("RGB")
        thumb.thumbnail((thumb_px, thumb_px))
        return thumb
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


class _Thumbs:
    """Writes each thumbnail once under `folder`; names are built from integers only."""

    def __init__(self, folder: Path, database_paths: Sequence[str], thumb_px: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.database_paths, self.thumb_px = folder, database_paths, thumb_px
        self.links: dict[str, str] = {}

    def query(self, query_index: int, path: str) -> str:
        return self._link(f"q{int(query_index):05d}.jpg", path)

    def database(self, index: int) -> str:
        return self._link(f"db{int(index):06d}.jpg", self.database_paths[index])

    def _link(self, name: str, src: str) -> str:
        if name not in self.links:
            write_thumbnail(str(src), self.folder / name, self.thumb_px)
            self.links[name] = f"thumbs/{name}"
        return self.links[name]


# --- HTML ------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _candidates(thumbs: _Thumbs, candidates: list | None, scores: list | None, correct: list | None) -> str:
    """Figures of the first TOP_SHOWN candidates of one ranking, marked right / wrong with their score."""
    if candidates is None:
        return "<em>not re-ranked</em>"
    scores, correct = scores or [], correct or []
    figures = []
    for rank, index in enumerate(candidates[:TOP_SHOWN]):
        if index is None or index < 0:
            continue  # faiss pads with -1 when the database has fewer than K images
        if index >= len(thumbs.database_paths):
            raise IndexError(f"candidate {index} out of range for {len(thumbs.database_paths)} database paths")
        score = f"{scores[rank]:.3f}" if rank < len(scores) and scores[rank] is not None else "?"
        if correct:
            right = rank < len(correct) and bool(correct[rank])
            kind, mark = ("right", RIGHT_MARK) if right else ("wrong", WRONG_MARK)
        else:  # no positions (--no-labels): neither right nor wrong
            kind, mark = "unlabelled", ""
        figures.append(
            f'<figure class="{kind}" title="{_e(thumbs.database_paths[index])}">'
            f'<img src="{_e(thumbs.database(index))}" alt="database {index}">'
            f"<figcaption>{mark} #{rank + 1} {score}</figcaption></figure>")
    return "".join(figures) or "<em>no candidates</em>"


def _sample_row(thumbs: _Thumbs, row: dict[str, Any], reranked: bool) -> str:
    caption = f"query {int(row['query_index'])}" + ("<br>no positive" if row["has_positive"] is False else "")
    cells = [
        f'<figure title="{_e(row["query_path"])}"><img src="{_e(thumbs.query(row["query_index"], row["query_path"]))}" '
        f'alt="query {int(row["query_index"])}"><figcaption>{caption}</figcaption></figure>',
        _candidates(thumbs, row["global_candidates"], row["global_scores"], row["global_correct"]),
    ]
    if reranked:
        cells.append(_candidates(thumbs, row.get("reranked_candidates"), row.get("rerank_scores"),
                                 row.get("reranked_correct")))
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _recall_table(recall: dict[str, Any], reranked: bool, baseline: dict[str, Any] | None = None) -> str:
    """One row per N: global, re-ranked and their difference, then the raw-pixel baseline."""
    head = "<tr><th>N</th><th>global %</th>" + ("<th>re-ranked %</th><th>difference</th>" if reranked else "")
    if baseline:
        head += f'<th title="{_e(baseline["name"])}">{BASELINE_LABEL} %</th>'
    body = []
    for n, before, after in recall_rows(recall):
        extra = ""
        if reranked:
            extra = "<td></td><td></td>" if after is None else f"<td>{after:.1f}</td><td>{after - before:+.1f}</td>"
        if baseline:
            pixels = baseline["recall"].get(str(n))
            extra += "<td></td>" if pixels is None else f"<td>{100.0 * float(pixels):.1f}</td>"
        body.append(f"<tr><td>{n}</td><td>{before:.1f}</td>{extra}</tr>")
    return f'<table class="recall">{head}</tr>{"".join(body)}</table>'


def _baseline_text(baseline: dict[str, Any] | None) -> str:
    if not baseline:
        return ""
    return (f'<p class="note">{BASELINE_LABEL.capitalize()} ({_e(baseline["name"])}): every image squashed to '
            f"16 x 16 RGB, its mean removed, database images ranked by correlation with the query. "
            f'{_e(baseline.get("note", ""))}</p>\n')


def _rerank_score_text(rerank: dict[str, Any]) -> str:
    """How a candidate's re-ranking score is made: the two pair logits, plus w x the global cosine."""
    if not rerank.get("available"):
        return "not run"
    weight = rerank.get("global_weight") or 0.0
    return "logit(q, db) + logit(db, q)" + (f" + {weight:g} x global cosine" if weight else "")


def _right_answers_text(report: dict[str, Any]) -> str:
    """Which database images count as right: a radius, or the ground-truth file that lists them."""
    truth = report.get("ground_truth")
    if truth:
        return truth["positives"]
    if "positive_radius_m" in report:
        return f"database images within {float(report['positive_radius_m']):g} m"
    return "none (no labels)"


def _facts(report: dict[str, Any]) -> str:
    counts, rerank = report["counts"], report.get("rerank") or {}
    facts = [
        ("database images", counts["database"]),
        ("queries", counts["queries"]),
        ("queries with a positive", counts["queries_with_positive"]),
        ("right answers", _right_answers_text(report)),
        ("preprocessing", _preprocessing_text(report.get("preprocessing"))),
        ("checkpoint", report.get("checkpoint", "")),
        ("re-ranked top K", rerank.get("top_k", "") if rerank.get("available") else "not run"),
        ("re-ranking score", _rerank_score_text(rerank)),
    ]
    facts += [(f"time: {name}", f"{float(seconds):.1f} s") for name, seconds in (report.get("timings_s") or {}).items()]
    rows = "".join(f'<tr><th class="text">{_e(k)}</th><td class="text">{_e(v)}</td></tr>' for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _preprocessing_text(pre: dict[str, Any] | None) -> str:
    """"short_side at 322 px (from --resize): database 322 x 434, queries 322 x 434 (H x W)"."""
    if not pre:
        return "not recorded"
    sizes = ", ".join(f"{name} {h} x {w}" for name, (h, w) in (pre.get("input_hw") or {}).items())
    return (f"{pre.get('resize')} at {pre.get('image_size')} px (from {pre.get('chosen_by', 'checkpoint')})"
            + (f": {sizes} (H x W)" if sizes else ""))


def _page(title: str, report: dict[str, Any], reranked: bool, sample_rows: list[str], n_missed: int,
          labelled: bool = True) -> str:
    note = (report.get("rerank") or {}).get("note", "")
    scope = "" if reranked else "<p><strong>Re-ranking was not run: global recall only.</strong></p>"
    if labelled:
        baseline = report.get("baseline")
        recall = f"<h2>Recall@N</h2>{_recall_table(report['recall'], reranked, baseline)}\n" \
                 f"{_baseline_text(baseline)}{_facts(report)}\n" \
                 f'<img src="recall.png" alt="Recall@N curve">'
        legend = f"{n_missed} with a wrong global top-1. {RIGHT_MARK} right, {WRONG_MARK} wrong, then rank and score."
    else:
        recall = f"<p><strong>No positions (--no-labels): predictions only, no recall.</strong></p>\n{_facts(report)}"
        legend = "Candidates with rank and score (no positions, so neither right nor wrong)."
    columns = "<th>query</th><th>global top 5</th>" + ("<th>re-ranked top 5</th>" if reranked else "")
    samples = (f"<h2>Sampled queries</h2><p>{len(sample_rows)} of {report['counts']['queries']} queries, {legend}</p>"
               f'<table class="samples"><tr>{columns}</tr>{"".join(sample_rows)}</table>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n{scope}"
            + (f'<p class="note">{_e(note)}</p>' if note else "")
            + f"\n{recall}\n{samples}\n</body></html>\n")
