"""Shared fixtures: tiny real JPEGs, an @-named dataset with known bad inputs, a local Ray."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from placeforge.geo import utm_to_latlon

# Ray workers must import this checkout, whatever the working directory of the test run.
REPO = Path(__file__).resolve().parents[1]


def fill_like_trained(module, seed: int, is_scale) -> None:
    """Every parameter of `module` random and far from its init, so a tensor loaded into the wrong
    place changes the output: scales (`is_scale(name, param)`: LayerNorm weights, layer-scale
    gammas) near 1, matrices fan-in scaled, tokens, positions and biases large."""
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if is_scale(name, param):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim > 1 and "token" not in name and "pos_embed" not in name:
                param.copy_(noise / math.sqrt(param[0].numel()))  # fan-in scaled matrices
            else:
                param.copy_(noise)  # tokens, positions, biases: large, so a misplaced one shows


def jpeg_bytes(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def at_name(east: float, north: float, zone: int = 10, letter: str = "S", heading: float | str = "",
            lat: float | None = None, lon: float | None = None) -> str:
    """A 14-field @ name (downloader format); lat/lon computed from UTM unless given."""
    if lat is None or lon is None:
        la, lo, _ = utm_to_latlon(np.array([east]), np.array([north]), np.array([zone]), np.array([letter >= "N"]))
        lat, lon = float(la[0]), float(lo[0])
    return f"@{east:.2f}@{north:.2f}@{zone}@{letter}@{lat:.7f}@{lon:.7f}@pano@@{heading}@@@@201905@@.jpg"


@pytest.fixture
def at_dataset(tmp_path: Path) -> dict:
    """An @-folder with 3 good places (5, 6, 7 images), and one of each kind of bad input.

    Returns the root and the reasons the build must report, with their counts.
    """
    root = tmp_path / "city_at"
    (root / "train").mkdir(parents=True)
    (root / "empty_sub").mkdir()
    seed = 0
    good = 0
    for place, count in enumerate([5, 6, 7]):
        for i in range(count):
            east = 551_007.0 + place * 100.0 + i * 0.5  # all inside one 15 m cell per place
            (root / "train" / at_name(east, 4_180_007.0 + i * 0.3, heading=i * 60)).write_bytes(jpeg_bytes(seed))
            seed += 1
            good += 1
    bad = root / "train"
    # Bad images inside place 0's cell, so only their own defect can set them aside.
    (bad / at_name(551_001.0, 4_180_008.0)).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    truncated = jpeg_bytes(999)
    (bad / at_name(551_002.0, 4_180_008.0)).write_bytes(truncated[: len(truncated) // 2])
    (bad / at_name(551_003.0, 4_180_008.0)).write_bytes(jpeg_bytes(0))  # same bytes as place 0's first image
    (bad / "notes.txt").write_text("not an image")
    (bad / "@1@2@.jpg").write_bytes(jpeg_bytes(7))
    (bad / "@nan@nan@10@S@nan@nan@pano@@@@@@201905@@.jpg").write_bytes(jpeg_bytes(8))
    for i in range(2):  # a place 2 km away with only 2 images
        (bad / at_name(553_007.0 + i, 4_180_007.0)).write_bytes(jpeg_bytes(100 + i))
    return {
        "root": root,
        "good": good,
        "inputs": good + 8,
        "reasons": {
            "decode_error": 2,
            "duplicate": 1,
            "not_an_image": 1,
            "bad_name": 1,
            "bad_coordinates": 1,
            "place_too_small": 2,
        },
    }


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs, shared by the tests of one module."""
    import ray

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield ray
    ray.shutdown()
