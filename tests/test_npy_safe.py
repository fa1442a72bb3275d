"""Index files that other tools pickled are read without running their pickle (evaluation.npy_safe)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from placeforge.evaluation.npy_safe import UnsafeFileError, load_index_lists, load_npy


def save_objects(path, rows) -> None:
    array = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        array[i] = row
    np.save(path, array, allow_pickle=True)


def test_plain_arrays_and_lists_of_indices_round_trip(tmp_path):
    np.save(tmp_path / "q.npy", np.array([3, 0, 7]))
    np.save(tmp_path / "names.npy", np.array(["train_val/cph/query/images/a.jpg", "b.jpg"]))
    assert load_npy(tmp_path / "q.npy").tolist() == [3, 0, 7]
    assert load_npy(tmp_path / "names.npy").tolist() == ["train_val/cph/query/images/a.jpg", "b.jpg"]
    save_objects(tmp_path / "p.npy", [np.array([4, 1]), np.array([], dtype=np.int64), np.array([9], dtype=np.int32)])
    assert [row.tolist() for row in load_index_lists(tmp_path / "p.npy")] == [[4, 1], [], [9]]


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    save_objects(tmp_path / "bad.npy", [np.array([1]), Payload(str(marker))])
    with pytest.raises(UnsafeFileError, match=r"posix\.mkdir|os\.mkdir|nt\.mkdir"):
        load_index_lists(tmp_path / "bad.npy")
    assert not marker.exists()  # np.load(allow_pickle=True) would have made it
    np.load(tmp_path / "bad.npy", allow_pickle=True)
    assert marker.exists()  # ...as this shows


def test_rows_that_are_not_index_lists_are_refused(tmp_path):
    save_objects(tmp_path / "floats.npy", [np.array([1.5])])
    with pytest.raises(ValueError, match="row 0 is not a list of integers"):
        load_index_lists(tmp_path / "floats.npy")
    save_objects(tmp_path / "negative.npy", [np.array([2, -1])])
    with pytest.raises(ValueError, match="row 0 holds a negative index"):
        load_index_lists(tmp_path / "negative.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"x" * 20)
    with pytest.raises(ValueError):
        load_npy(tmp_path / "junk.npy")
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError):
        load_npy(tmp_path / "pickle.npy")  # a bare pickle is not a .npy file
