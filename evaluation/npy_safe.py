"""Reading .npy index files that other tools pickled, without running what a pickle can run.

    positives = load_index_lists("msls_val/msls_val_pIdx.npy")   # [Q] int64 arrays
    query_rows = load_npy("msls_val/msls_val_qIdx.npy")           # a plain array: no pickle at all

Ground-truth files that ship with VPR benchmarks (GSV-Cities' MSLS-val subset: positives per
query as a NumPy object array) can only be read with `np.load(allow_pickle=True)`, which
executes whatever the file's pickle names.  Here a file without objects is read with
`allow_pickle=False`; one with objects is unpickled by an unpickler that resolves only the
names NumPy itself writes for arrays (`_reconstruct`, `ndarray`, `dtype`, `scalar`), so a
crafted file fails with an error instead of running code.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

try:  # NumPy 2 writes numpy._core, NumPy 1 numpy.core; the objects are the same
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core import multiarray as _multiarray

_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafeFileError(ValueError):
    """The file is not an array NumPy wrote: its pickle names something else."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"the pickle names {module}.{name}, which is not part of a NumPy array") from None


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """The array in a .npy file; object arrays through the restricted unpickler.

    Raises:
        UnsafeFileError: an object array whose pickle names anything but NumPy's array parts.
        ValueError: not a .npy file, or a pickle that is not the array its header announces.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{path}: .npy format version {version[0]}.{version[1]} is not read here (1.0, 2.0)")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        try:
            array = _ArraysOnly(f).load()
        except UnsafeFileError as error:
            raise UnsafeFileError(f"{path}: {error}; refused without running it") from None
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a readable NumPy object array ({error})") from None
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise ValueError(f"{path}: the pickle is not the {tuple(shape)} array its header announces")
    return array


def load_index_lists(path: str | os.PathLike) -> list[np.ndarray]:
    """A 1-D .npy of integer lists (one per query, e.g. its positive database rows) -> int64 arrays.

    Raises:
        ValueError: not 1-D, or an element that is not a list of non-negative integers.
    """
    array = load_npy(path)
    if array.ndim != 1:
        raise ValueError(f"{path}: expected one list per row (1-D), got shape {array.shape}")
    lists = []
    for row, item in enumerate(array):
        values = np.asarray(item)
        if values.ndim > 1 or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
            raise ValueError(f"{path}: row {row} is not a list of integers ({values.dtype}, shape {values.shape})")
        values = values.reshape(-1).astype(np.int64)
        if values.size and values.min() < 0:
            raise ValueError(f"{path}: row {row} holds a negative index")
        lists.append(values)
    return lists
