"""The street-level pinhole camera: pose, per-column rays and the horizon row.

Compass headings: 0 = north (+y), clockwise, so east (+x) is 90.  Pitch > 0
looks up (the horizon moves down the image); roll tilts the horizon.  Pixels
are square, so one focal length in pixels serves rows and columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    x_m: float
    y_m: float
    heading_deg: float
    pitch_deg: float = 0.0
    roll_deg: float = 0.0
    height_m: float = 2.5
    fov_deg: float = 80.0
    width: int = 320
    height: int = 240

    @property
    def focal_px(self) -> float:
        return (self.width / 2.0) / math.tan(math.radians(self.fov_deg) / 2.0)

    def column_offsets_px(self) -> np.ndarray:
        """[W] float32 horizontal offset of each column centre from the image centre."""
        return np.arange(self.width, dtype=np.float32) + 0.5 - self.width / 2.0

    def column_rays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit ray of each column in world axes and its angle to the optical axis.

        Returns:
            (dir_x [W], dir_y [W], cos_off_axis [W]) float32; a hit at ray length t
            has depth (distance along the optical axis) t * cos_off_axis.
        """
        off = np.arctan(self.column_offsets_px() / self.focal_px)
        compass = np.radians(self.heading_deg) + off
        return np.sin(compass).astype(np.float32), np.cos(compass).astype(np.float32), np.cos(off).astype(np.float32)

    def horizon_rows(self) -> np.ndarray:
        """[W] float32 image row (can be fractional, outside the image) of the horizon per column."""
        pitch = math.tan(math.radians(self.pitch_deg)) * self.focal_px
        roll = math.tan(math.radians(self.roll_deg))
        return (self.height / 2.0 + pitch + self.column_offsets_px() * roll).astype(np.float32)

    def to_camera(self, x_m: np.ndarray, y_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points -> (depth along the view [N], offset to the right [N]) in metres."""
        h = math.radians(self.heading_deg)
        rx, ry = np.asarray(x_m) - self.x_m, np.asarray(y_m) - self.y_m
        return rx * math.sin(h) + ry * math.cos(h), rx * math.cos(h) - ry * math.sin(h)
