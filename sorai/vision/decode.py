"""Image bytes -> an upright RGB PIL image, refusing what is not safe or sane to decode.

Checked in order, each before any pixel is decoded: the byte count, SVG and other non-images
(sniffed), the format (raster formats Pillow reads), and the canvas size from the header (a
decompression bomb is a small file declaring a huge canvas). Then the pixels are decoded in
full, so a truncated file fails here and not later inside OCR.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from sorai.errors import ImageError

MAX_BYTES = 20 * 2**20  # an encoded image; OpenAI's own limit per image
MAX_PIXELS = 40 * 10**6  # decoded canvas (an RGB copy is 120 MB)
MAX_SIDE = 16384
# Raster formats only: Pillow also opens EPS (runs Ghostscript), and formats nobody sends.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be: encoded bytes, decoded pixels, longest side."""

    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    max_side: int = MAX_SIDE


def _sniffed_kind(data: bytes) -> str | None:
    """A name for well-known non-raster content, for a message better than 'not an image'."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "an SVG (vector) image"
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith(b"%pdf"):
        return "a PDF document"
    return None


def decode_image(
    data: bytes, name: str = "image", limits: ImageLimits | None = None
) -> Image.Image:
    """`data` decoded to an RGB image, upright (EXIF orientation applied), transparency
    flattened onto white; ImageError naming `name` and the limit for anything refused."""
    limits = limits or ImageLimits()
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"{name} is {len(data)} bytes; images may be at most {limits.max_bytes} bytes"
        )
    if not data:
        raise ImageError(f"{name} is empty; send a PNG, JPEG, GIF, WebP, BMP or TIFF image")
    kind = _sniffed_kind(data)
    if kind is not None:
        raise ImageError(
            f"{name} is {kind}, not a raster image; send a PNG, JPEG, GIF, WebP, BMP or TIFF "
            "(render vector images to PNG first)"
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) above its own limit; ours is stricter
            # and checked below, before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            f"{name} is not an image this server reads (PNG, JPEG, GIF, WebP, BMP or TIFF)"
        ) from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name} declares a canvas larger than {limits.max_pixels} pixels (refused "
            "before decoding)"
        ) from None
    width, height = image.size
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise ImageError(
            f"{name} is {width}x{height} pixels; images may have at most "
            f"{limits.max_pixels // 10**6} megapixels and {limits.max_side} pixels a side "
            "(refused before decoding)"
        )
    if width == 0 or height == 0:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # the first frame of an animation
            upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name} could not be decoded ({exc}); is the file complete?") from None
    return to_rgb(upright)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16/32-bit grey scaled down, transparency over white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = image.convert("F") if image.mode == "F" else image.convert("I")
        _, high = grey.getextrema()
        top = 65535 if image.mode.startswith("I;16") else max(float(high), 255.0)
        return grey.point(lambda v: v * 255 / top).convert("L").convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info or image.mode == "P":
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
