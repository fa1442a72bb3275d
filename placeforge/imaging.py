"""Decode, resize and re-encode one image: the per-image work of shard building.

JPEG inputs are decoded with libjpeg's DCT scaling (`Image.draft`) at the smallest
power-of-two reduction that still covers the target size, which makes the decode
of a large image several times cheaper than a full decode followed by a resize.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageFile

# A truncated file must fail, never be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(ValueError):
    """The bytes are not a decodable image; the message says why."""


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side scaled to `short_side`; images already smaller stay as they are."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    scale = short_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def reencode_jpeg(data: bytes, short_side: int, quality: int = 90) -> Encoded:
    """Decode any PIL-readable image, resize its short side to `short_side`, encode as RGB JPEG.

    Raises:
        DecodeError: corrupt, truncated or non-image bytes (and decompression bombs).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = target_size(img.width, img.height, short_side)
            if img.format == "JPEG":
                img.draft("RGB", size)
            img.load()
            rgb = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DecodeError(f"{type(err).__name__}: {err}") from err
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return Encoded(out.getvalue(), size[0], size[1])


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
