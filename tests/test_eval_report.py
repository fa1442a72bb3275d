"""evaluation.report: the HTML page, the recall PNG and the thumbnails, written to a temp dir.

Real tiny JPEGs, a hand-made predictions table; no Ray, no GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from placeforge.evaluation.report import (
    PLACEHOLDER_GREY,
    pick_sample,
    recall_figure,
    recall_rows,
    write_report,
    write_thumbnail,
)

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220),
           (250, 150, 0), (90, 90, 250)]
SCRIPT_NAME = "<script>alert(1)<.jpg"

SCHEMA = pa.schema([
    ("query_index", pa.int32()), ("query_path", pa.string()), ("has_positive", pa.bool_()),
    ("global_candidates", pa.list_(pa.int32())), ("global_scores", pa.list_(pa.float32())),
    ("global_correct", pa.list_(pa.bool_())),
    ("reranked_candidates", pa.list_(pa.int32())), ("rerank_scores", pa.list_(pa.float32())),
    ("reranked_correct", pa.list_(pa.bool_())),
])


def solid_jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=95)
    return str(path)


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    """8 database images (one named with <script>, one not an image) and 5 queries."""
    src = tmp_path / "data"
    src.mkdir()
    database = [solid_jpeg(src / f"db_{i}.jpg", COLOURS[i]) for i in range(6)]
    database.append(solid_jpeg(src / SCRIPT_NAME, (10, 10, 10)))  # index 6
    broken = src / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    database.append(str(broken))  # index 7
    queries = [solid_jpeg(src / f"query_{q}.jpg", COLOURS[q], size=(200, 100)) for q in range(5)]
    return {"database": database, "queries": queries, "out": tmp_path / "out"}


def predictions(queries: list[str], reranked: bool) -> pa.Table:
    """5 queries.  q0: global top-1 wrong, re-ranked top-1 right; q1, q2: right both ways;
    q3: wrong both ways; q4: no positive.  Candidates include db 6 (<script> name) and 7 (broken)."""
    g_cand = [[1, 0, 6, 2, 3, 4], [1, 2, 3, 4, 5], [2, 7, 0, 1, 3], [0, 1, 2, 4, 5], [5, 6, 0, 1, 2]]
    g_corr = [[False, True, False, False, False, False], [True] + [False] * 4, [True] + [False] * 4,
              [False] * 5, [False] * 5]
    r_cand = [[0, 1, 6, 2, 3], [1, 2, 3, 4, 5], [2, 7, 0, 1, 3], [1, 0, 2, 4, 5], [6, 5, 0, 1, 2]]
    r_corr = [[True] + [False] * 4, [True] + [False] * 4, [True] + [False] * 4, [False] * 5, [False] * 5]
    n = len(queries)
    columns = {
        "query_index": list(range(n)), "query_path": queries, "has_positive": [True, True, True, True, False],
        "global_candidates": g_cand, "global_scores": [[0.9 - 0.1 * k for k in range(len(c))] for c in g_cand],
        "global_correct": g_corr,
        "reranked_candidates": r_cand if reranked else [None] * n,
        "rerank_scores": [[0.95 - 0.1 * k for k in range(5)] for _ in r_cand] if reranked else [None] * n,
        "reranked_correct": r_corr if reranked else [None] * n,
    }
    return pa.table(columns, schema=SCHEMA)


def report_dict(reranked: bool, baseline: bool = False) -> dict:
    curve_g = [0.4, 0.5, 0.55, 0.6, 0.7, 0.72, 0.74, 0.76, 0.78, 0.8]
    curve_r = [0.6, 0.65, 0.7, 0.72, 0.75, 0.77, 0.79, 0.81, 0.82, 0.83]
    curve_b = [0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.4, 0.5, 0.5, 0.5]
    return {
        "title": "Toy eval <b>bold</b>",
        "recall": {"global": {"1": 0.4, "5": 0.7, "10": 0.8},
                   "reranked": {"1": 0.6, "5": 0.75, "10": 0.83} if reranked else None},
        "recall_curve": {"global": curve_g, "reranked": curve_r if reranked else None},
        "counts": {"database": 8, "queries": 5, "queries_with_positive": 4},
        "checkpoint": "/ckpt/<evil>&run/step_100.pt",
        "rerank": {"available": reranked, "top_k": 5 if reranked else 0,
                   "note": "re-ranking raised R@1 by 20.0 points" if reranked else "checkpoint has no pair classifier"},
        "positive_radius_m": 25.0,
        "timings_s": {"embed": 1.25, "search": 0.5},
        "baseline": {"name": "thumbnail 16x16 correlation", "recall": {"1": 0.2, "5": 0.4, "10": 0.5},
                     "recall_curve": curve_b, "unreadable": 1,
                     "note": "the model beats raw pixels by 20.0 points."} if baseline else None,
    }


def marks(table: pa.Table, column: str) -> tuple[int, int]:
    """(right, wrong) among the first 5 candidates of every row of `column`."""
    shown = [c[:5] for c in table.column(column).to_pylist() if c is not None]
    right = sum(sum(c) for c in shown)
    return right, sum(len(c) for c in shown) - right


def test_writes_page_png_and_thumbnails(dataset):
    table = predictions(dataset["queries"], True)
    paths = write_report(dataset["out"], report_dict(True, baseline=True), table, dataset["database"], sample_queries=5)
    out = dataset["out"]
    assert paths == {"html": out / "report.html", "png": out / "recall.png"}
    with Image.open(paths["png"]) as png:
        assert png.format == "PNG" and 300 <= png.width <= 2000 and 200 <= png.height <= 2000
    page = paths["html"].read_text(encoding="utf-8")
    # Recall table: percentages with one decimal and signed differences.
    assert "<td>1</td><td>40.0</td><td>60.0</td><td>+20.0</td>" in page
    assert "<td>10</td><td>80.0</td><td>83.0</td><td>+3.0</td><td>50.0</td></tr>" in page
    assert "raw-pixel baseline %</th>" in page and "the model beats raw pixels by 20.0 points." in page
    assert "re-ranking raised R@1 by 20.0 points" in page and "global recall only" not in page
    assert '<img src="recall.png"' in page and "1.2 s" in page and "re-ranked top 5" in page
    # All 5 queries: 1 query image + 5 global + 5 re-ranked candidates each, plus the curve.
    assert page.count("<img") == 1 + 5 * (1 + 5 + 5)
    right_g, wrong_g = marks(table, "global_correct")
    right_r, wrong_r = marks(table, "reranked_correct")
    assert (right_g, right_r) == (3, 3)
    assert page.count("\u2713") == 1 + right_g + right_r  # 1: the legend line
    assert page.count("\u2717") == 1 + wrong_g + wrong_r
    assert page.count('class="right"') == right_g + right_r
    # Query 0: global top-1 (db 1) wrong, re-ranked top-1 (db 0) right.
    row0 = page.split('alt="query 0"')[1].split("</tr>")[0]
    global0, reranked0 = row0.split("</td><td>")[1:3]
    assert global0.index('class="wrong"') < global0.index('class="right"')
    assert reranked0.startswith('<figure class="right"') and 'src="thumbs/db000000.jpg"' in reranked0
    assert "no positive" in page.split('alt="query 4"')[1].split("</td>")[0]
    assert not list(out.rglob(".*tmp*")), "temporary files left behind"


def test_text_from_data_is_escaped(dataset):
    page = write_report(dataset["out"], report_dict(True), predictions(dataset["queries"], True),
                        dataset["database"], sample_queries=5)["html"].read_text(encoding="utf-8")
    assert "db000006.jpg" in page  # the <script>-named image is shown ...
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;.jpg" in page  # ... with its path escaped
    assert "<evil>" not in page and "/ckpt/&lt;evil&gt;&amp;run/step_100.pt" in page
    assert "<b>" not in page and "<h1>Toy eval &lt;b&gt;bold&lt;/b&gt;</h1>" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_thumbnails_named_by_index_inside_out_dir(dataset, tmp_path):
    before = {p for p in tmp_path.rglob("*") if dataset["out"] not in p.parents and p != dataset["out"]}
    out = dataset["out"]
    page = write_report(out, report_dict(True), predictions(dataset["queries"], True), dataset["database"],
                        sample_queries=5, thumb_px=32)["html"].read_text(encoding="utf-8")
    after = {p for p in tmp_path.rglob("*") if dataset["out"] not in p.parents and p != dataset["out"]}
    assert after == before, "wrote outside out_dir"
    names = sorted(p.name for p in (out / "thumbs").iterdir())
    assert names == [f"db{i:06d}.jpg" for i in range(8)] + [f"q{q:05d}.jpg" for q in range(5)]
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == \
        {"report.html", "recall.png"} | {f"thumbs/{n}" for n in names}
    links = re.findall(r'src="([^"]+)"', page)
    assert links and all(link == "recall.png" or re.fullmatch(r"thumbs/(q\d{5}|db\d{6})\.jpg", link) for link in links)
    with Image.open(out / "thumbs" / "q00000.jpg") as q0, Image.open(out / "thumbs" / "db000002.jpg") as db2:
        assert q0.size == (32, 16) and db2.size == (32, 24)  # longest side 32, aspect kept
        assert np.abs(np.asarray(db2.convert("RGB"), np.int16)[12, 16] - COLOURS[2]).max() < 20


def test_unreadable_image_gets_placeholder(dataset, tmp_path):
    out = dataset["out"]
    write_report(out, report_dict(True), predictions(dataset["queries"], True), dataset["database"],
                 sample_queries=5, thumb_px=40)
    with Image.open(out / "thumbs" / "db000007.jpg") as tile:  # db 7 is not a JPEG
        assert tile.size == (40, 40)
        assert np.abs(np.asarray(tile.convert("RGB"), np.int16) - PLACEHOLDER_GREY).max() < 10
    assert write_thumbnail(str(tmp_path / "missing.jpg"), tmp_path / "a.jpg", 16) is False
    assert write_thumbnail(str(tmp_path), tmp_path / "b.jpg", 16) is False  # a directory
    assert write_thumbnail(dataset["database"][0], tmp_path / "c.jpg", 16) is True
    with Image.open(tmp_path / "a.jpg") as a:
        assert a.size == (16, 16)


def test_without_rerank_the_page_says_global_only(dataset):
    report = report_dict(False)
    paths = write_report(dataset["out"], report, predictions(dataset["queries"], False), dataset["database"],
                         sample_queries=5)
    page = paths["html"].read_text(encoding="utf-8")
    assert "global recall only" in page and "checkpoint has no pair classifier" in page
    assert "re-ranked" not in page.split("<h2>Recall@N</h2>")[1].split("</table>")[0]
    assert "re-ranked top 5" not in page and "difference" not in page
    assert "<td>5</td><td>70.0</td></tr>" in page and "raw-pixel" not in page  # no baseline in this report
    assert page.count("<img") == 1 + 5 * (1 + 5)
    with Image.open(paths["png"]) as png:
        assert png.format == "PNG"


def test_recall_figure_draws_the_baseline_dashed_and_grey():
    fig = recall_figure([0.4, 0.6, 0.8], [0.5, 0.7, 0.9], "toy", curve_baseline=[0.1, 0.2, 0.3])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines) == ["global descriptor", "re-ranked", "raw-pixel baseline (16x16 thumbnails)"]
    baseline = lines["raw-pixel baseline (16x16 thumbnails)"]
    assert baseline.get_linestyle() == "--" and baseline.get_color() == "grey"
    assert baseline.get_ydata().tolist() == pytest.approx([10.0, 20.0, 30.0])
    assert lines["global descriptor"].get_linestyle() == "-"
    assert len(recall_figure([0.4, 0.6], None, "toy").axes[0].get_lines()) == 1


def test_sample_is_seeded_and_mixes_misses(dataset):
    table = predictions(dataset["queries"], True)
    shown = []
    for seed in (0, 0, 1, 2, 3):
        out = dataset["out"] / f"seed{seed}"
        page = write_report(out, report_dict(True), table, dataset["database"], sample_queries=2,
                            seed=seed)["html"].read_text(encoding="utf-8")
        queries = re.findall(r'alt="query (\d+)"', page)
        assert len(queries) == 2
        assert {"0", "3"} & set(queries), "no query with a wrong global top-1 in the sample"
        assert "4" not in queries  # no-positive queries only fill a short sample
        shown.append(tuple(queries))
    assert shown[0] == shown[1]


def test_pick_sample_mix_and_fill():
    hit = np.array([True] * 10 + [False] * 10)
    positive = np.ones(20, dtype=bool)
    sample = pick_sample(hit, positive, 6, seed=0)
    assert len(sample) == 6 and np.all(np.diff(sample) > 0)
    assert (~hit[sample]).sum() == 3
    assert np.array_equal(sample, pick_sample(hit, positive, 6, seed=0))
    assert any(not np.array_equal(sample, pick_sample(hit, positive, 6, seed=s)) for s in range(1, 5))
    # Only 1 miss: the hits fill up; more than Q asked: every row.
    few = np.array([True] * 5 + [False])
    assert (~few[pick_sample(few, np.ones(6, bool), 4, seed=0)]).sum() == 1
    assert np.array_equal(pick_sample(few, np.ones(6, bool), 50, seed=0), np.arange(6))
    # Queries without a positive come last.
    no_pos = np.array([True, True, False, False])
    assert set(pick_sample(np.zeros(4, bool), no_pos, 2, seed=0).tolist()) == {0, 1}
    assert len(pick_sample(hit, positive, 0, seed=0)) == 0


def test_recall_rows_sorted_numerically():
    rows = recall_rows({"global": {"10": 0.8, "1": 0.4, "5": 0.7}, "reranked": None})
    assert rows == [(1, pytest.approx(40.0), None), (5, pytest.approx(70.0), None), (10, pytest.approx(80.0), None)]
    rows = recall_rows({"global": {"1": 0.4}, "reranked": {"1": 0.5}})
    assert rows == [(1, pytest.approx(40.0), pytest.approx(50.0))]


def test_out_of_range_candidate_fails_loudly(dataset):
    table = predictions(dataset["queries"], False)
    bad = table.set_column(3, "global_candidates", pa.array([[99]] * 5, type=pa.list_(pa.int32())))
    with pytest.raises(IndexError, match="99"):
        write_report(dataset["out"], report_dict(False), bad, dataset["database"], sample_queries=5)
