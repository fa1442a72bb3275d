"""The synthetic-city configuration: one frozen dataclass, a tiny preset for tests.

Sizes are counted in places and images, distances in metres, angles in degrees.
The resolved config is written into `synth_manifest.json`; a re-run compares it
field by field to decide whether the output folder is already complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from placeforge.config import ConfigError

# The val city's origin is the @ origin moved VAL_OFFSET_EAST_M east in its UTM zone.
# A city is at most (blocks_x + 2) * MAX_PITCH_M wide (blocks <= 60 m plus streets
# <= 15 m, city.make_grid), so validate() bounds blocks_x to keep them VAL_GAP_M apart.
VAL_OFFSET_EAST_M = 5000.0
VAL_GAP_M = 1000.0
MAX_PITCH_M = 75.0


@dataclass(frozen=True)
class SynthConfig:
    """Sizes, camera and origins of the synthetic datasets (defaults: 6770 images)."""

    seed: int = field(default=0, metadata={"help": "master seed: city layout, poses, conditions, pixels"})
    train_places: int = field(default=200, metadata={"help": "places (street points) in the training district"})
    test_places: int = field(default=100, metadata={"help": "places in the test district (database images)"})
    headings_per_place: int = field(
        default=4, metadata={"help": "camera headings per place, evenly spaced from the street direction"}
    )
    # 6: each view once like the database and 5 times under query conditions.  With 2, a
    # small encoder saw too few day/night pairs of one facade to learn the invariance
    # (validation R@1 25 -> 33 at 1000 steps, docs/benchmarks.md "Making it learn").
    train_captures: int = field(
        default=6, metadata={"help": "train images per place and heading, each under other conditions"}
    )
    queries: int = field(default=300, metadata={"help": "test queries (harder conditions, jittered pose)"})
    val_places: int = field(
        default=100,
        metadata={"help": "places in the validation city (database images, like the test split); 0 = no val split"},
    )
    val_queries: int = field(default=150, metadata={"help": "val queries, made like the test queries"})
    gsv_places: int = field(default=120, metadata={"help": "places in the GSV-Cities style second city"})
    gsv_images_per_place: int = field(default=6, metadata={"help": "images per GSV place (4..8)"})
    place_spacing_m: float = field(default=7.5, metadata={"help": "distance between neighbouring places"})
    blocks_x: int = field(default=5, metadata={"help": "city blocks from west to east (rows follow from the counts)"})
    width: int = field(default=320, metadata={"help": "image width in pixels"})
    height: int = field(default=240, metadata={"help": "image height in pixels"})
    fov_deg: float = field(default=80.0, metadata={"help": "horizontal field of view"})
    camera_height_m: float = field(default=2.5, metadata={"help": "camera height above the road"})
    query_jitter_m: float = field(default=1.5, metadata={"help": "max query offset from its place, per axis"})
    query_jitter_deg: float = field(default=8.0, metadata={"help": "max query heading offset"})
    jpeg_quality: int = field(default=90, metadata={"help": "JPEG quality 1..100"})
    at_origin_lat: float = field(default=37.7749, metadata={"help": "latitude of the @-layout city origin"})
    at_origin_lon: float = field(default=-122.4194, metadata={"help": "longitude of the @-layout city origin"})
    gsv_city: str = field(default="SynthMelbourne", metadata={"help": "GSV city name (letters and digits)"})
    gsv_origin_lat: float = field(default=-37.8136, metadata={"help": "latitude of the GSV city origin"})
    gsv_origin_lon: float = field(default=144.9631, metadata={"help": "longitude of the GSV city origin"})
    workers: int = field(default=0, metadata={"help": "render processes (0 = os.cpu_count(), 1 = in-process)"})

    @classmethod
    def tiny(cls) -> "SynthConfig":
        """About 220 small images, a few seconds on one core: the preset the tests use."""
        return cls(
            train_places=12,
            test_places=8,
            train_captures=2,
            queries=24,
            val_places=6,
            val_queries=12,
            gsv_places=8,
            gsv_images_per_place=4,
            blocks_x=2,
            width=160,
            height=120,
        )

    def validate(self) -> None:
        """Raise ConfigError for values the generator cannot honour."""
        positive = ("train_places", "test_places", "headings_per_place", "train_captures", "gsv_places", "blocks_x")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("queries", "val_places", "val_queries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        widest = int((VAL_OFFSET_EAST_M - VAL_GAP_M) // MAX_PITCH_M) - 2
        if self.val_places > 0 and self.blocks_x > widest:
            raise ConfigError(f"blocks_x: at most {widest} with a val split (its city stands "
                              f"{VAL_OFFSET_EAST_M / 1000:g} km east of the @ city), got {self.blocks_x}")
        if not 4 <= self.gsv_images_per_place <= 8:
            raise ConfigError(f"gsv_images_per_place: must be 4..8 (as in GSV-Cities), got {self.gsv_images_per_place}")
        if not (32 <= self.width <= 4096 and 32 <= self.height <= 4096):
            raise ConfigError(f"width/height: must be 32..4096 pixels, got {self.width}x{self.height}")
        if not 20.0 <= self.fov_deg <= 150.0:
            raise ConfigError(f"fov_deg: must be 20..150, got {self.fov_deg}")
        if not 0.5 <= self.camera_height_m <= 5.0:
            raise ConfigError(f"camera_height_m: must be 0.5..5 (below every roof), got {self.camera_height_m}")
        if not 2.0 <= self.place_spacing_m <= 50.0:
            raise ConfigError(f"place_spacing_m: must be 2..50, got {self.place_spacing_m}")
        # A query must stay on the road (streets are >= 10 m wide) and within 25 m of its place.
        if not 0.0 <= self.query_jitter_m <= 2.0:
            raise ConfigError(f"query_jitter_m: must be 0..2 so queries stay on the road, got {self.query_jitter_m}")
        if not 0.0 <= self.query_jitter_deg <= 45.0:
            raise ConfigError(f"query_jitter_deg: must be 0..45, got {self.query_jitter_deg}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality: must be 1..100, got {self.jpeg_quality}")
        if not (self.gsv_city.isascii() and self.gsv_city.isalnum()):
            raise ConfigError(f"gsv_city: letters and digits only (it is split on '_'), got {self.gsv_city!r}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")
        for name in ("at_origin_lat", "gsv_origin_lat"):
            if not -79.0 <= getattr(self, name) <= 83.0:
                raise ConfigError(f"{name}: must be inside the UTM domain (-79..83), got {getattr(self, name)}")
        for name in ("at_origin_lon", "gsv_origin_lon"):
            if not -180.0 <= getattr(self, name) <= 180.0:
                raise ConfigError(f"{name}: must be -180..180, got {getattr(self, name)}")

    def image_counts(self) -> dict[str, int]:
        """Images per split, known before anything is rendered."""
        return {
            "train": self.train_places * self.headings_per_place * self.train_captures,
            "test/database": self.test_places * self.headings_per_place,
            "test/queries": self.queries,
            "gsv": self.gsv_places * self.gsv_images_per_place,
            "val/database": self.val_places * self.headings_per_place,
            "val/queries": self.val_queries if self.val_places > 0 else 0,
        }


PRESETS = {"default": SynthConfig, "tiny": SynthConfig.tiny}


def preset(name: str) -> SynthConfig:
    """The named preset; an unknown name fails with the list of valid names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
