"""Integer hashing for procedural texture: the same integer keys give the same value everywhere.

Textures are functions of world or facade coordinates (a brick's row and column,
a window's floor and bay), never of a random stream, so a facade looks the same
from every camera position and in every process.
"""

from __future__ import annotations

import numpy as np


def mix(x: np.ndarray) -> np.ndarray:
    """One round of the lowbias32 finaliser (Wellons): full avalanche on uint32 arrays."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def hash_u32(*keys: np.ndarray | int) -> np.ndarray:
    """A uint32 hash of integer keys, broadcast together (floats are truncated first; scalars give [1])."""
    # At least 1-d: numpy warns on overflow for 0-d scalars but wraps arrays silently.
    arrays = np.broadcast_arrays(*[np.atleast_1d(k) for k in keys])
    h = np.full(arrays[0].shape, 0x9E3779B9, dtype=np.uint32)
    for key in arrays:
        h = mix(h ^ key.astype(np.int64).astype(np.uint32))
    return h


def hash01(*keys: np.ndarray | int) -> np.ndarray:
    """A float32 in [0, 1) per broadcast element of the integer keys."""
    return (hash_u32(*keys) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def hash01_scalar(*keys: int) -> float:
    """`hash01` of plain ints, in pure Python: the same value, without numpy's per-call cost."""
    h = 0x9E3779B9
    for key in keys:
        x = (h ^ (int(key) & 0xFFFFFFFF)) & 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        h = x ^ (x >> 16)
    return (h >> 8) / float(1 << 24)


def bits01(h: np.ndarray, shift: int) -> np.ndarray:
    """A float32 in [0, 1) from 16 bits of a hash, starting at bit `shift` (0 or 16).

    Two independent values from one hash, where a second full hash would cost ten ops.
    """
    return ((h >> np.uint32(shift)) & np.uint32(0xFFFF)).astype(np.float32) * np.float32(1.0 / 65536)


def frac(x: np.ndarray) -> np.ndarray:
    """x - floor(x): the position inside a repeating period, much faster than `x % 1.0`."""
    return x - np.floor(x)


def fade(px_m: np.ndarray, period_m: float) -> np.ndarray:
    """Contrast kept for a pattern of `period_m` seen at `px_m` metres per pixel.

    1 when a pixel is much smaller than the period, 0 once it nears the period:
    fine patterns (mortar, paving, dashes) fade out with distance instead of aliasing.
    """
    return np.clip(2.0 - 2.5 * np.asarray(px_m, dtype=np.float32) / period_m, 0.0, 1.0)
