"""Ground truth from files: MSLS-val's 740-query subset (GSV-Cities' msls_val_*.npy), Nordland in
VPR-Bench's template, and the generic --database-list / --queries-list / --ground-truth options.

A tiny MSLS tree (train_val/<city>/{database,query}/images/<key>.jpg) is written with the four
index files in GSV-Cities' exact form: plain string arrays of paths relative to the root, a
plain int array qIdx (which qImages are evaluated), and pIdx, a pickled object array made by
NumPy with one int array per *qIdx row* (GSV-Cities and Pair-VPR index it with the position in
the evaluated queries: `gt[q_idx]` over `qImages[qIdx]`).  The lists are deliberately not in path
order, one listed database image and one listed query are missing on disk, one query's only
positive is the missing image, and one query of qImages is not in qIdx.

A tiny Nordland is written in VPR-Bench's template (MubarizZaffar/VPR-Bench: ref/ and query/ of
<integer>.jpg, zero-padded to 7 digits as the download and Pair-VPR's Nordland_*Images.npy name
them, and ground_truth_new.npy: a pickled [Q, 2] object array whose row i is [i, list of right
ref rows], as datasets/Nordland/ground_truth_new.npy is).  The tests that run the evaluation on a
real local Ray are marked `ray`.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from placeforge.evaluation.benchmarks import read_benchmark
from placeforge.evaluation.ground_truth import (
    numbered_images,
    read_path_list,
    read_positives,
    read_vprbench_positives,
    remap_positives,
    restrict_split,
)
from placeforge.evaluation.testset import read_split
from placeforge.ingest import SourceError
from placeforge.models.checkpoint import save_model_checkpoint
from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.pipelines.evaluate import main
from tests.conftest import at_name, jpeg_bytes

DB = [  # msls_val_dbImages.npy, not in path order; "gone" is listed but not on disk
    "train_val/sf/database/images/s2.jpg",
    "train_val/cph/database/images/c1.jpg",
    "train_val/sf/database/images/s0.jpg",
    "train_val/cph/database/images/c0.jpg",
    "train_val/cph/database/images/c2.jpg",
    "train_val/sf/database/images/s1.jpg",
    "train_val/cph/database/images/gone.jpg",
]
QUERIES = [  # msls_val_qImages.npy; "qskip" is not evaluated (not in qIdx), "qgone" is not on disk
    "train_val/sf/query/images/qs0.jpg",
    "train_val/cph/query/images/qc1.jpg",
    "train_val/cph/query/images/qc0.jpg",
    "train_val/cph/query/images/qskip.jpg",
    "train_val/sf/query/images/qs1.jpg",
    "train_val/cph/query/images/qgone.jpg",
]
EVALUATED = [4, 0, 2, 1, 5]  # msls_val_qIdx.npy: rows of QUERIES, not sorted
POSITIVES = [[5], [2, 0], [3], [6], [1]]  # msls_val_pIdx.npy: per qIdx row, rows of DB
# The same, by path: what each evaluated query's positives are, whatever order the lists have.
RIGHT = {"qs1": {"s1"}, "qs0": {"s0", "s2"}, "qc0": {"c0"}, "qc1": set()}  # qc1's only positive is gone
TWIN = {"qs1": "s1", "qs0": "s0", "qc0": "c2", "qc1": "c1"}  # each query's bytes: a copy of this database image


def key(path: str) -> str:
    return Path(path).stem


def write_msls(tmp_path: Path) -> tuple[Path, Path]:
    """(MSLS root, folder of the four index files as GSV-Cities ships them)."""
    root = tmp_path / "msls"
    for seed, rel in enumerate(DB[:-1]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg_bytes(seed))
    by_key = {key(rel): rel for rel in DB}
    for rel in QUERIES:
        if key(rel) in TWIN:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes((root / by_key[TWIN[key(rel)]]).read_bytes())
    (root / QUERIES[3]).write_bytes(jpeg_bytes(50))
    files = tmp_path / "gsv-cities" / "datasets" / "msls_val"
    files.mkdir(parents=True)
    np.save(files / "msls_val_dbImages.npy", np.array(DB))
    np.save(files / "msls_val_qImages.npy", np.array(QUERIES))
    np.save(files / "msls_val_qIdx.npy", np.array(EVALUATED, dtype=np.int64))
    p_idx = np.empty(len(POSITIVES), dtype=object)
    for row, positives in enumerate(POSITIVES):
        p_idx[row] = np.array(positives, dtype=np.int64)
    np.save(files / "msls_val_pIdx.npy", p_idx, allow_pickle=True)  # pickled, as GSV-Cities' file
    return root, files


def positives_by_key(database, queries) -> dict[str, set[str]]:
    truth = queries.ground_truth
    return {key(q): {key(database.paths[j]) for j in truth.positives[i]} for i, q in enumerate(queries.paths)}


def reasons(split) -> dict[str, tuple[str, str]]:
    return {r["input"]: (r["reason"], r["detail"]) for r in split.rejects.to_pylist()}


def test_msls_val_740_evaluates_the_listed_queries_with_the_files_positives_mapped_through_paths(tmp_path):
    root, files = write_msls(tmp_path)
    database, queries = read_benchmark(f"msls-val-740:{root}", ground_truth_dir=files)
    present = sorted(str(root.resolve() / rel) for rel in DB[:-1])
    assert database.paths == present and database.east_north is None  # sorted by path; positions not needed
    assert [key(p) for p in queries.paths] == ["qc0", "qc1", "qs0", "qs1"]  # qIdx only, sorted; qskip not listed
    assert positives_by_key(database, queries) == RIGHT
    assert all(np.all(np.diff(p) > 0) for p in queries.ground_truth.positives)
    assert queries.ground_truth.database_paths is database.paths
    assert queries.ground_truth.source == str(files / "msls_val_pIdx.npy")
    assert queries.ground_truth.positives_set_aside == 1  # qc1's positive "gone"
    assert reasons(database) == {DB[6]: ("missing_file", f"{DB[6]} does not exist (listed at "
                                                         "msls_val_dbImages.npy:row 6)")}
    assert reasons(queries) == {QUERIES[5]: ("missing_file", f"{QUERIES[5]} does not exist (listed at "
                                                             "msls_val_qIdx.npy:row 4)")}

    # Without labels: the same images, no ground truth.
    database, queries = read_benchmark(f"msls-val-740:{root}", no_labels=True, ground_truth_dir=files)
    assert len(database) == 6 and len(queries) == 4 and queries.ground_truth is None


def test_msls_val_740_finds_its_files_in_root_msls_val_and_names_what_is_missing(tmp_path):
    root, files = write_msls(tmp_path)
    with pytest.raises(SourceError, match=r"msls-val-740 reads msls_val_dbImages.npy, .*msls_val_pIdx.npy from "
                                          r".*msls/msls_val \(ROOT/msls_val/; or give --ground-truth-dir DIR\)"):
        read_benchmark(f"msls-val-740:{root}")
    files.rename(root / "msls_val")
    database, queries = read_benchmark(f"msls-val-740:{root}")
    assert positives_by_key(database, queries) == RIGHT
    with pytest.raises(SourceError, match=r"expects .*/train_val: ROOT is the folder that holds train_val/"):
        read_benchmark(f"msls-val-740:{root / 'train_val'}", ground_truth_dir=root / "msls_val")
    with pytest.raises(SourceError, match="unknown benchmark 'msls-val-74'; valid: pitts30k, .*, msls-val-740"):
        read_benchmark(f"msls-val-74:{root}")
    with pytest.raises(SourceError, match="nordland has no index files; --ground-truth-dir goes with msls-val-740"):
        read_benchmark(f"nordland:{root}", ground_truth_dir=root / "msls_val")


def test_index_files_that_do_not_fit_are_refused_and_a_pickle_that_runs_code_is_never_run(tmp_path):
    root, files = write_msls(tmp_path)
    np.save(files / "msls_val_qIdx.npy", np.array([0, 1, 6]))
    with pytest.raises(SourceError, match="msls_val_qIdx.npy names row 6, but msls_val_qImages.npy has rows 0..5"):
        read_benchmark(f"msls-val-740:{root}", ground_truth_dir=files)
    np.save(files / "msls_val_qIdx.npy", np.array(EVALUATED[:4]))
    with pytest.raises(SourceError, match="has 5 rows for 4 listed queries"):
        read_benchmark(f"msls-val-740:{root}", ground_truth_dir=files)
    np.save(files / "msls_val_qIdx.npy", np.array(EVALUATED))
    bad = np.empty(len(POSITIVES), dtype=object)
    bad[:] = [np.array([0])] * 4 + [np.array([7])]
    np.save(files / "msls_val_pIdx.npy", bad, allow_pickle=True)
    with pytest.raises(SourceError, match="query row 4 names database row 7; the database list has rows 0..6"):
        read_benchmark(f"msls-val-740:{root}", ground_truth_dir=files)
    np.save(files / "msls_val_pIdx.npy", np.array([datetime.date(2020, 1, 1)] * 5, dtype=object), allow_pickle=True)
    with pytest.raises(SourceError, match=r"the pickle names datetime.date, .*refused without running it"):
        read_benchmark(f"msls-val-740:{root}", ground_truth_dir=files)


def test_remapping_follows_paths_not_positions_in_the_files():
    # Lists in file order -> Split rows: database list row j sits at database_rows[j] in the Split.
    database_rows = np.array([2, 0, -1, 1, 0])  # row 2 set aside; row 4 repeats row 1's image
    query_rows = np.array([1, -1, 0, 1])  # row 1 set aside; row 3 repeats row 0's image
    positives = [np.array([3, 2]), np.array([0]), np.array([4, 1, 0]), np.array([0])]
    remapped, dropped = remap_positives(positives, query_rows, database_rows, num_queries=2)
    assert [p.tolist() for p in remapped] == [[0, 2], [1]]  # ascending, each once; the repeat's row 3 is not used
    assert dropped == 1  # query row 0's database row 2
    with pytest.raises(SourceError, match="query row 1 names database row 5"):
        remap_positives([np.array([0]), np.array([5])], np.array([0, 1]), database_rows, 2)
    with pytest.raises(SourceError, match="3 rows of positives for 2 listed queries"):
        remap_positives(positives[:3], np.array([0, 1]), database_rows, 2)


def test_list_and_ground_truth_files_in_text_and_npy(tmp_path):
    (tmp_path / "q.txt").write_text("# queries\n  b/q1.jpg \n\na/q0.jpg\r\n")
    assert read_path_list(tmp_path / "q.txt") == ["b/q1.jpg", "a/q0.jpg"]
    np.save(tmp_path / "q.npy", np.array(["b/q1.jpg", "a/q0.jpg"]))
    assert read_path_list(tmp_path / "q.npy") == ["b/q1.jpg", "a/q0.jpg"]
    np.save(tmp_path / "ints.npy", np.arange(3))
    with pytest.raises(SourceError, match="expected a 1-D array of path strings, got int64"):
        read_path_list(tmp_path / "ints.npy")

    (tmp_path / "gt.txt").write_text("# right database rows per query\n3 1\n\n0,2\n")
    assert [p.tolist() for p in read_positives(tmp_path / "gt.txt", 3)] == [[3, 1], [], [0, 2]]
    with pytest.raises(SourceError, match="has 3 rows for 4 listed queries"):
        read_positives(tmp_path / "gt.txt", 4)
    (tmp_path / "bad.txt").write_text("1\n-2\n")
    with pytest.raises(SourceError, match="line 2: '-2' is not a list of database-list row numbers"):
        read_positives(tmp_path / "bad.txt", 2)


def test_a_queries_list_restricts_a_split_read_with_positions_and_reports_what_it_cannot_find(tmp_path):
    folder = tmp_path / "queries"
    folder.mkdir()
    names = [at_name(550_000.0 + 10 * i, 4_180_000.0) for i in range(4)]
    for seed, name in enumerate(names):
        (folder / name).write_bytes(jpeg_bytes(seed))
    (folder / "notes.jpg").write_bytes(jpeg_bytes(9))  # not an @ name: the reader sets it aside
    split = read_split(f"atname:{folder}", "queries")
    listed = [names[3], f"./{names[1]}", "missing.jpg", "../outside.jpg", names[3], "notes.jpg", "list.txt"]
    kept = restrict_split(split, folder, listed, "q.txt")
    assert kept.paths == [split.paths[1], split.paths[3]]  # the Split's order, not the list's
    assert np.array_equal(kept.east_north, split.east_north[[1, 3]]) and kept.zone.tolist() == [10, 10]
    assert kept.rejects.slice(0, split.rejected).equals(split.rejects)  # the reader's own, then the list's
    new = {r["input"]: (r["reason"], r["detail"]) for r in kept.rejects.slice(split.rejected).to_pylist()}
    assert {k: v[0] for k, v in new.items()} == {
        "missing.jpg": "missing_file", "q.txt:row 3": "path_outside_root", "q.txt:row 4": "duplicate",
        "notes.jpg": "not_in_metadata", "q.txt:row 6": "not_an_image"}
    assert new["missing.jpg"][1] == "missing.jpg does not exist (listed at q.txt:row 2)"
    with pytest.raises(SourceError, match="none of the 1 paths listed in q.txt is among the 4 images"):
        restrict_split(split, folder, ["missing.jpg"], "q.txt")


def test_cli_refuses_list_options_that_do_not_fit(tmp_path, capsys):
    for args, message in ((["--test-set", "d", "--ground-truth", "gt.txt"], "--ground-truth needs --database-list"),
                          (["--benchmark", "msls-val-740:/m", "--queries-list", "q.txt"], "a benchmark names its own"),
                          (["--test-set", "d", "--ground-truth-dir", "g"], "--ground-truth-dir goes with --benchmark"),
                          (["--test-set", "d", "--database-list", "d.txt", "--queries-list", "q.txt",
                            "--ground-truth", "gt.txt", "--no-labels"], "--ground-truth goes without --no-labels")):
        with pytest.raises(SystemExit) as stop:
            main(["--checkpoint", "m.pt", "--out", str(tmp_path / "o"), *args])
        assert stop.value.code == 2 and message in capsys.readouterr().err


# --- Nordland in VPR-Bench's template ---------------------------------------------------------------

NORDLAND_REFS = 12  # ref/0000000.jpg .. ref/0000011.jpg (summer)
NORDLAND_GT = [[0, 1], [3, 4, 5], [6, 7, 8], [10, 11]]  # per query/000000i.jpg (winter): right ref rows
NORDLAND_TWIN = [1, 2, 7, 9]  # each query's bytes: a copy of this ref image (2 and 9 are not right)


def frame(number: int) -> str:
    return f"{number:07d}.jpg"


def write_vprbench_nordland(tmp_path: Path) -> Path:
    """ROOT as VPR-Bench's datasets/Nordland/ with the images downloaded into it."""
    root = tmp_path / "VPR-Bench" / "datasets" / "Nordland"
    (root / "ref").mkdir(parents=True)
    (root / "query").mkdir()
    for number in range(NORDLAND_REFS):
        (root / "ref" / frame(number)).write_bytes(jpeg_bytes(200 + number))
    for number, twin in enumerate(NORDLAND_TWIN):
        (root / "query" / frame(number)).write_bytes((root / "ref" / frame(twin)).read_bytes())
    write_vprbench_ground_truth(root / "ground_truth_new.npy", [[i, right] for i, right in enumerate(NORDLAND_GT)])
    return root


def write_vprbench_ground_truth(path: Path, rows: list) -> None:
    table = np.empty((len(rows), 2), dtype=object)  # [Q, 2]: a Python int and a Python list per row
    for i, (number, right) in enumerate(rows):
        table[i, 0], table[i, 1] = number, right
    np.save(path, table, allow_pickle=True)


def test_nordland_vprbench_reads_ref_and_query_in_numeric_order_with_the_files_positives(tmp_path):
    root = write_vprbench_nordland(tmp_path)
    (root / "ref" / "notes.jpg").write_bytes(jpeg_bytes(1))  # not a number: set aside, numbers unmoved
    (root / "ref" / "0000012.png").write_bytes(jpeg_bytes(2))  # VPR-Bench reads *.jpg only
    (root / "ref" / "ReadMe.txt").write_text("not an image: not an input")
    (root / "ref" / "sub").mkdir()
    (root / "ref" / "sub" / frame(12)).write_bytes(jpeg_bytes(3))  # below the folder: not read (its glob)
    database, queries = read_benchmark(f"nordland-vprbench:{root}")
    resolved = root.resolve()
    assert database.paths == [str(resolved / "ref" / frame(i)) for i in range(NORDLAND_REFS)]
    assert queries.paths == [str(resolved / "query" / frame(i)) for i in range(len(NORDLAND_GT))]
    assert [p.tolist() for p in queries.ground_truth.positives] == NORDLAND_GT
    assert queries.ground_truth.database_paths is database.paths and queries.ground_truth.positives_set_aside == 0
    assert queries.ground_truth.source == str(root / "ground_truth_new.npy")
    assert {r["input"]: r["reason"] for r in database.rejects.to_pylist()} == {
        "ref/notes.jpg": "bad_name", "ref/0000012.png": "bad_name"}
    assert queries.rejected == 0

    # The ground truth where VPR-Bench's checkout keeps it, the images elsewhere.
    elsewhere = tmp_path / "gt"
    elsewhere.mkdir()
    (root / "ground_truth_new.npy").rename(elsewhere / "ground_truth_new.npy")
    with pytest.raises(SourceError, match=r"nordland-vprbench reads ground_truth_new.npy from .*Nordland \(ROOT; or "
                                          r"give --ground-truth-dir DIR\)"):
        read_benchmark(f"nordland-vprbench:{root}")
    _, queries = read_benchmark(f"nordland-vprbench:{root}", ground_truth_dir=elsewhere)
    assert [p.tolist() for p in queries.ground_truth.positives] == NORDLAND_GT
    _, queries = read_benchmark(f"nordland-vprbench:{root}", no_labels=True)  # no file needed
    assert queries.ground_truth is None and len(queries) == 4
    with pytest.raises(SourceError, match=r"nordland-vprbench expects .*/datasets/ref \(database ref/, queries "
                                          r"query/ below the root"):
        read_benchmark(f"nordland-vprbench:{root.parent}", ground_truth_dir=elsewhere)


def test_numeric_order_is_by_number_not_by_text_and_a_gap_is_refused(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    for number in (10, 2, 0, 1, 9, 3, 4, 5, 6, 7, 8):  # unpadded: "10.jpg" sorts before "2.jpg" as text
        (folder / f"{number}.jpg").write_bytes(b"jpeg")
    entries, rejects = numbered_images(tmp_path, "ref")
    assert entries == [f"ref/{number}.jpg" for number in range(11)] and rejects.num_rows == 0
    (folder / "5.jpg").unlink()
    with pytest.raises(SourceError, match=r"holds 10 numbered images, but not the numbers 0..9 \(first missing: 5\)"):
        numbered_images(tmp_path, "ref")
    (folder / "05.jpg").write_bytes(b"jpeg")
    (folder / "005.jpg").write_bytes(b"jpeg")
    with pytest.raises(SourceError, match=r"ref/005.jpg and ref/05.jpg are both image number 5|"
                                          r"ref/05.jpg and ref/005.jpg are both image number 5"):
        numbered_images(tmp_path, "ref")


def test_vprbench_ground_truth_that_does_not_fit_is_refused_and_a_pickle_that_runs_code_is_never_run(tmp_path):
    root = write_vprbench_nordland(tmp_path)
    gt = root / "ground_truth_new.npy"
    assert [p.tolist() for p in read_vprbench_positives(gt)] == NORDLAND_GT
    cases = [
        ([[0, [0]], [1, [1]], [2, [2]]], "has 3 rows for the 4 images of"),
        ([[0, [0]], [2, [1]], [1, [2]], [3, [3]]], r"row 1: the query number is 2, not 1"),
        ([[0, [0]], [1, [1]], [2, [2]], [3, [12]]], "query row 3 names database row 12; the database list has "
                                                    "rows 0..11"),
        ([[0, [0]], [1, [-1]], [2, [2]], [3, [3]]], r"row 1: \[-1\] is not a list of ref row numbers"),
        ([[0, [0]], [1, ["a"]], [2, [2]], [3, [3]]], r"row 1: \['a'\] is not a list of ref row numbers"),
        ([[0, [0]], [True, [1]], [2, [2]], [3, [3]]], "row 1: the query number is True, not 1"),
    ]
    for rows, message in cases:
        write_vprbench_ground_truth(gt, rows)
        with pytest.raises(SourceError, match=message):
            read_benchmark(f"nordland-vprbench:{root}")
    np.save(gt, np.array([[0, 1]] * 4))  # a plain [4, 2] int array: no lists of right rows
    with pytest.raises(SourceError, match=r"row 0: 1 is not a list of ref row numbers"):
        read_benchmark(f"nordland-vprbench:{root}")
    np.save(gt, np.arange(4))
    with pytest.raises(SourceError, match=r"expected VPR-Bench's \[queries, 2\] array .*got shape \(4,\)"):
        read_benchmark(f"nordland-vprbench:{root}")
    write_vprbench_ground_truth(gt, [[i, datetime.date(2020, 1, 1)] for i in range(4)])
    with pytest.raises(SourceError, match=r"the pickle names datetime.date, .*refused without running it"):
        read_benchmark(f"nordland-vprbench:{root}")


# --- end to end: pipelines/evaluate.py on a real local Ray ----------------------------------------

@pytest.fixture(scope="module")
def global_only_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = EncoderConfig(name="vit_tiny_test", image_size=56, descriptor_dim=32)
    return save_model_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "global_only.pt")


def hand_recall(out: Path, right: dict[str, set[str]], ns: tuple[int, ...]) -> dict[int, float]:
    """Recall@N counted by hand from the stored descriptors: rank the database by L2 distance,
    look the top N up by file name in `right`; every query of `right` is in the denominator."""
    db_paths = json.loads((out / "paths.json").read_text())["database"]
    q_paths = json.loads((out / "paths.json").read_text())["queries"]
    db = np.load(out / "features" / "database" / "descriptors.npy").astype(np.float32)
    q = np.load(out / "features" / "queries" / "descriptors.npy").astype(np.float32)
    hits = {n: 0 for n in ns}
    for i, query in enumerate(q_paths):
        order = np.argsort(((db - q[i]) ** 2).sum(axis=1), kind="stable")
        for n in ns:
            hits[n] += bool({key(db_paths[j]) for j in order[:n]} & right[key(query)])
    return {n: hits[n] / len(right) for n in ns}


@pytest.mark.ray
def test_recall_from_the_files_ground_truth_equals_a_hand_count_by_benchmark_and_by_generic_options(
        local_ray, global_only_checkpoint, tmp_path, capsys):
    root, files = write_msls(tmp_path)
    database, queries = read_benchmark(f"msls-val-740:{root}", ground_truth_dir=files)
    runs = {
        "benchmark": ["--benchmark", f"msls-val-740:{root}", "--ground-truth-dir", str(files)],
        "generic": ["--database", str(root), "--queries", str(root), "--database-list", str(tmp_path / "db.txt"),
                    "--queries-list", str(tmp_path / "q.txt"), "--ground-truth", str(tmp_path / "gt.txt")],
    }
    (tmp_path / "db.txt").write_text("\n".join(DB) + "\n")
    (tmp_path / "q.txt").write_text("\n".join(QUERIES[i] for i in EVALUATED) + "\n")
    (tmp_path / "gt.txt").write_text("\n".join(" ".join(map(str, p)) for p in POSITIVES) + "\n")
    reports = {}
    for name, args in runs.items():
        out = tmp_path / name
        code = main(["--checkpoint", str(global_only_checkpoint), *args, "--out", str(out), "--batch-size", "8",
                     "--recall-at", "1,2,3", "--baseline", "false"])
        printed, err = capsys.readouterr()
        assert code == 0, err
        report = reports[name] = json.loads((out / "report.json").read_text())
        assert report["counts"] == {**report["counts"], "database": 6, "queries": 4, "queries_with_positive": 3,
                                    "rejected": 2}
        assert report["ground_truth"]["kind"] == "file" and report["ground_truth"]["positives_set_aside"] == 1
        assert "positive_radius_m" not in report  # a file's positives have no radius
        assert f"right answers: from {report['ground_truth']['file']}; 3 of 4 queries have one" in printed
        assert "1 query(ies) have no positive in the database: misses at every N" in report["rerank"]["note"]
        (out / "paths.json").write_text(json.dumps({"database": database.paths, "queries": queries.paths}))
        recall = {int(n): r for n, r in report["recall"]["global"].items()}
        assert recall == hand_recall(out, RIGHT, (1, 2, 3))
        assert recall[1] == 0.5  # qs1 and qs0 are copies of a positive; qc0 copies c2 (not its positive); qc1 has none
    assert reports["generic"]["recall"] == reports["benchmark"]["recall"]
    assert reports["benchmark"]["title"] == "global_only.pt on msls-val-740"
    assert reports["generic"]["ground_truth"]["file"] == str(tmp_path / "gt.txt")


@pytest.mark.ray
def test_nordland_vprbench_end_to_end_recall_equals_a_hand_count(local_ray, global_only_checkpoint, tmp_path, capsys):
    root = write_vprbench_nordland(tmp_path)
    out = tmp_path / "eval"
    code = main(["--checkpoint", str(global_only_checkpoint), "--benchmark", f"nordland-vprbench:{root}",
                 "--out", str(out), "--batch-size", "8", "--recall-at", "1,2,3", "--baseline", "false"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {**report["counts"], "database": 12, "queries": 4, "queries_with_positive": 4,
                                "rejected": 0}
    assert report["ground_truth"] == {**report["ground_truth"], "kind": "file",
                                      "file": str(root / "ground_truth_new.npy")}
    assert report["title"] == "global_only.pt on nordland-vprbench"
    database, queries = read_benchmark(f"nordland-vprbench:{root}")
    (out / "paths.json").write_text(json.dumps({"database": database.paths, "queries": queries.paths}))
    right = {frame(q)[:-4]: {frame(r)[:-4] for r in rows} for q, rows in enumerate(NORDLAND_GT)}
    recall = {int(n): r for n, r in report["recall"]["global"].items()}
    assert recall == hand_recall(out, right, (1, 2, 3))
    assert recall[1] == 0.5  # queries 0 and 2 are copies of a right ref image; 1 and 3 of a wrong one
