"""Stage-1 pairs that overlap: which two images of a place make a Siamese MIM pair, and what part of each.

    rule = PairRule(max_heading_diff_deg=50.0, panorama_views=True)
    for pair in stage1_pairs(place_samples, rule, random.Random(0)): ...   # one Stage1Pair per sample

Two random images of a 15 m cell may face opposite ways and share nothing to reconstruct.
Pair-VPR (csiro-robotics/Pair-VPR, `pairvpr/datasets/pairs_dataset.py`, `PairsDataset.__getitem__`
and `get_crop`) pairs SF-XL panoramas by cropping both toward one focal point 10-20 m from the
cell centroid, keeping pairs whose views of it differ by 3-50 degrees.  Here:

- Perspective images with a heading: the two headings differ by at most `max_heading_diff_deg`;
  a place with no such pair gives its closest-heading pair (kind CLOSEST_HEADING, counted).
- Panoramas (a strip at least PANORAMA_MIN_ASPECT times wider than high, taken to be a full
  360-degree equirectangular view whose centre column looks along its heading): `focal_pair`
  picks two and a focal point; each image is then the strip's columns that look at it.
- Images without a heading (or a position, for panoramas): two at random (kind NO_HEADING).

Every pair carries its PairKind, so a loader can count how each epoch's pairs were made.
The geometry is pure functions of UTM metres and compass degrees (0 = north, clockwise).
"""

from __future__ import annotations

import enum
import io
import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from placeforge.shards.reader import PlaceSample

PANORAMA_MIN_ASPECT = 4.0  # SF-XL raw panoramas are 3328 x 512 (6.5); perspective images stay under ~2.5
# Pair-VPR crops 512 px of its 512 x 6.5 = 3328 px strips (pairs_dataset.py, PANO_WIDTH and get_crop): 55.4 degrees.
PANORAMA_VIEW_FOV_DEG = 360.0 * 512 / 3328
FOCAL_DISTANCE_M = (10.0, 20.0)  # focal point from the centroid (stageone_default_config.yaml focal_dist{,_max})
VIEW_DIFF_DEG = (3.0, 50.0)  # accepted difference of the two views of the focal point (get_item's angcheck)
FOCAL_TRIES = 10  # Pair-VPR: at most 10 draws ...
RELAX_AFTER_TRIES = 5  # ... and from the 5th on any pair whose views differ by more than
RELAXED_MIN_DIFF_DEG = 0.1  # 0.1 degrees is taken; after the 10th, the last draw is taken as it is


class PairKind(enum.IntEnum):
    """How a pair was chosen (PairBatch.pair_kinds)."""

    RANDOM = 0  # any two images (no heading limit asked)
    WITHIN_HEADING = 1  # headings within the limit
    CLOSEST_HEADING = 2  # no pair within the limit: the place's closest-heading pair
    NO_HEADING = 3  # fewer than two images with a heading: any two
    PANORAMA_FOCAL = 4  # two panorama views of one focal point, 3-50 degrees apart
    PANORAMA_RELAXED = 5  # panorama views outside 3-50 degrees after Pair-VPR's tries


@dataclass(frozen=True)
class PairRule:
    """Stage 1's pairs: a training recipe's `pairs` section (`--pairs.panorama-views true`)."""

    max_heading_diff_deg: float = field(
        default=0.0, metadata={"help": "the two images of a pair face within this many degrees of each other "
                                       "(images with a heading; a place with no such pair gives its closest-heading "
                                       "pair, counted in the loader's log line); 0: any two images of the place"})
    panorama_views: bool = field(
        default=False, metadata={"help": "pair two panoramas (width >= 4 x height) of a place by cropping both "
                                         "toward a focal point 10-20 m from their centroid, views 3-50 degrees apart "
                                         "(Pair-VPR's SF-XL pairs); false: a panorama is one whole image"})
    one_per_place: bool = field(
        default=False, metadata={"help": "a place split over several shard samples (more images than the build's "
                                         "max_images_per_sample) gives one pair an epoch, as every other place "
                                         "(Pair-VPR); false: one pair per sample (trainer.data.make_loader)"})

    def validate(self) -> None:
        if not 0.0 <= self.max_heading_diff_deg <= 180.0:
            raise ValueError(f"pairs.max_heading_diff_deg must be in [0, 180], got {self.max_heading_diff_deg}")


@dataclass(frozen=True)
class PanoramaView:
    """Which way one image of a pair looks: the strip's heading and the bearing of the focal point."""

    heading_deg: float
    bearing_deg: float


@dataclass(frozen=True)
class Stage1Pair:
    place_id: int
    image_ids: tuple[int, int]
    jpegs: tuple[bytes, bytes]
    kind: PairKind
    views: tuple[PanoramaView | None, PanoramaView | None] = (None, None)  # set for panorama pairs


@dataclass(frozen=True)
class FocalPair:
    first: int  # index of the first panorama (the masked image)
    second: int
    focal_en: tuple[float, float]  # UTM east, north of the focal point, metres
    bearings_deg: tuple[float, float]  # compass bearing of the focal point from each panorama
    view_diff_deg: float  # |difference| of the two bearings, in [0, 180]
    within: bool  # view_diff_deg in VIEW_DIFF_DEG


# ---- geometry (pure) ----


def heading_diff_deg(a_deg: float, b_deg: float) -> float:
    """Smallest angle between two compass directions, in [0, 180] (headings need not be normalised)."""
    d = (a_deg - b_deg) % 360.0
    return min(d, 360.0 - d)


def bearing_deg(from_en: Sequence[float], to_en: Sequence[float]) -> float:
    """Compass bearing (0 = north, 90 = east) from one UTM point to another, in [0, 360)."""
    return math.degrees(math.atan2(to_en[0] - from_en[0], to_en[1] - from_en[1])) % 360.0


def view_columns(heading_deg: float, bearing_deg_: float, strip_width_px: int,
                 fov_deg: float = PANORAMA_VIEW_FOV_DEG) -> tuple[int, int]:
    """(start column, width) of the view of a 360-degree strip centred on compass `bearing_deg_`.

    The strip's centre column looks along `heading_deg` and bearings grow to the right (as
    Pair-VPR's get_crop reads SF-XL).  `start + width` may pass `strip_width_px`: the view
    wraps to column 0 (`crop_strip`).
    """
    width = max(1, round(strip_width_px * fov_deg / 360.0))
    centre = (0.5 + (bearing_deg_ - heading_deg) / 360.0) * strip_width_px
    return int(round(centre - width / 2)) % strip_width_px, width


def crop_strip(pixels: np.ndarray, start: int, width: int) -> np.ndarray:
    """Columns start .. start + width - 1 of a [H, W, C] strip, wrapping past W to 0: [H, width, C]."""
    return np.take(pixels, np.arange(start, start + width) % pixels.shape[1], axis=1)


def focal_pair(positions_en: np.ndarray, rng: np.random.Generator, tries: int = FOCAL_TRIES) -> FocalPair:
    """Two of N >= 2 panoramas and a focal point 10-20 m from their centroid that both look at.

    As Pair-VPR: the first panorama is drawn once; each try draws the second and a focal point
    (a uniform direction from the centroid at a uniform 10-20 m), and the first try whose two
    views differ by 3-50 degrees is taken; from the 5th try, any difference over 0.1 degrees;
    after `tries`, the last draw.  Pair-VPR draws the focal point once per item and only
    re-draws the second panorama (with replacement); here each try re-draws both and never the
    first panorama again, so that a place of two panoramas can still find an overlap.

    Args:
        positions_en: [N, 2] UTM east, north of the panoramas, metres.
    """
    n = len(positions_en)
    if n < 2:
        raise ValueError(f"focal_pair needs two panoramas, got {n}")
    centroid = positions_en.mean(axis=0)
    first = int(rng.integers(n))
    for attempt in range(1, tries + 1):
        second = int(rng.integers(n - 1))
        second += second >= first  # any panorama but the first
        direction = math.radians(rng.uniform(0.0, 360.0))
        distance_m = rng.uniform(*FOCAL_DISTANCE_M)
        focal = (centroid[0] + distance_m * math.sin(direction), centroid[1] + distance_m * math.cos(direction))
        bearings = (bearing_deg(positions_en[first], focal), bearing_deg(positions_en[second], focal))
        diff = heading_diff_deg(*bearings)
        within = VIEW_DIFF_DEG[0] <= diff <= VIEW_DIFF_DEG[1]
        if within or (attempt >= RELAX_AFTER_TRIES and diff > RELAXED_MIN_DIFF_DEG):
            break
    return FocalPair(first, second, (float(focal[0]), float(focal[1])), bearings, diff, within)


# ---- choosing a pair from a place sample ----


def _finite(value: object) -> float | None:
    """A per-image metadata number, or None when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def is_panorama(meta: dict) -> bool:
    """A strip at least PANORAMA_MIN_ASPECT times wider than high (its sample record's width, height)."""
    width, height = _finite(meta.get("width")), _finite(meta.get("height"))
    return bool(width and height and height > 0 and width >= PANORAMA_MIN_ASPECT * height)


def pick_heading_pair(headings_deg: Sequence[float | None], max_diff_deg: float,
                      rng: random.Random) -> tuple[int, int, PairKind]:
    """Two distinct image indices of a place (first = the masked image) and how they were chosen.

    Uniform over the pairs whose headings differ by at most `max_diff_deg`; none: the closest
    pair.  Fewer than two headings, or `max_diff_deg` 0: two images at random (exactly
    `rng.sample`, the draw of `shards.reader.same_place_pairs`).
    """
    n = len(headings_deg)
    known = [i for i, h in enumerate(headings_deg) if h is not None]
    if max_diff_deg <= 0 or len(known) < 2:
        a, b = rng.sample(range(n), 2)
        return a, b, PairKind.RANDOM if max_diff_deg <= 0 else PairKind.NO_HEADING
    candidates = [(heading_diff_deg(headings_deg[i], headings_deg[j]), i, j)
                  for k, i in enumerate(known) for j in known[k + 1:]]
    within = [(i, j) for d, i, j in candidates if d <= max_diff_deg]
    if within:
        (a, b), kind = rng.choice(within), PairKind.WITHIN_HEADING
    else:
        (_, a, b), kind = min(candidates), PairKind.CLOSEST_HEADING
    return (b, a, kind) if rng.random() < 0.5 else (a, b, kind)


def place_pair(sample: PlaceSample, rule: PairRule, rng: random.Random) -> Stage1Pair:
    """The pair one place sample (>= 2 images) gives under `rule`.

    With `rule.panorama_views`, a sample with two or more panoramas that have a heading and a
    position pairs two of them by `focal_pair`; its other images are not used.
    """
    headings = [_finite(m.get("heading_deg")) for m in sample.meta]
    if rule.panorama_views:
        panoramas = [i for i, m in enumerate(sample.meta) if is_panorama(m) and headings[i] is not None
                     and _finite(m.get("utm_east")) is not None and _finite(m.get("utm_north")) is not None]
        if len(panoramas) >= 2:
            positions = np.array([[sample.meta[i]["utm_east"], sample.meta[i]["utm_north"]] for i in panoramas],
                                 dtype=np.float64)  # [N, 2]
            found = focal_pair(positions, np.random.default_rng(rng.getrandbits(64)))
            a, b = panoramas[found.first], panoramas[found.second]
            kind = PairKind.PANORAMA_FOCAL if found.within else PairKind.PANORAMA_RELAXED
            views = (PanoramaView(headings[a], found.bearings_deg[0]), PanoramaView(headings[b], found.bearings_deg[1]))
            return Stage1Pair(sample.place_id, (sample.image_ids[a], sample.image_ids[b]),
                              (sample.jpegs[a], sample.jpegs[b]), kind, views)
    a, b, kind = pick_heading_pair(headings, rule.max_heading_diff_deg, rng)
    return Stage1Pair(sample.place_id, (sample.image_ids[a], sample.image_ids[b]), (sample.jpegs[a], sample.jpegs[b]),
                      kind)


def stage1_pairs(src: Iterable[PlaceSample], rule: PairRule, rng: random.Random) -> Iterator[Stage1Pair]:
    """One pair per place sample; samples of one image are skipped."""
    for sample in src:
        if len(sample.jpegs) >= 2:
            yield place_pair(sample, rule, rng)


def view_image(jpeg: bytes, view: PanoramaView | None) -> bytes:
    """The encoded image a pair member trains on: the whole image, or a panorama's view as an
    uncompressed BMP (no second lossy encode; `trainer.augment.decode_augment` reads either)."""
    if view is None:
        return jpeg
    with Image.open(io.BytesIO(jpeg)) as image:
        pixels = np.asarray(image.convert("RGB"))  # [H, W, 3]
    start, width = view_columns(view.heading_deg, view.bearing_deg, pixels.shape[1])
    out = io.BytesIO()
    Image.fromarray(crop_strip(pixels, start, width)).save(out, format="BMP")
    return out.getvalue()


def kind_counts(kinds: Iterable[int]) -> dict[str, int]:
    """{PairKind name (lower case): pairs} of the kinds that occur, e.g. for an epoch's log line."""
    counts = np.bincount(np.fromiter(kinds, dtype=np.int64), minlength=len(PairKind))
    return {k.name.lower(): int(counts[k]) for k in PairKind if counts[k]}
