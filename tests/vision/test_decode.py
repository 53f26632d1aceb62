"""Safe decoding: what is refused before a pixel is decoded, and how modes and EXIF come out."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from sorai.errors import ImageError
from sorai.vision.decode import ImageLimits, decode_image
from tests.vision.rendered import png

SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A 100-megapixel 1-bit PNG: a few kilobytes on disk, 300 MB as RGB."""
    return png(Image.new("1", (width, height)))


def test_a_plain_png_decodes_to_rgb() -> None:
    image = decode_image(png(Image.new("L", (40, 20), 128)))
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (40, 20), (128,) * 3)


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    data = bomb_png()
    assert len(data) < 100_000
    with pytest.raises(ImageError, match=r"10000x10000 pixels.*refused before decoding"):
        decode_image(data, "scan.png")


def test_a_truncated_png_is_refused() -> None:
    data = png(Image.effect_noise((200, 200), 60).convert("RGB"))
    with pytest.raises(ImageError, match="could not be decoded.*complete"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (SVG, "SVG"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "SVG"),
        (b"<!DOCTYPE html><html></html>", "HTML page"),
        (b"%PDF-1.7\n", "PDF"),
        (b"hello, world", "not an image"),
        (b"", "empty"),
    ],
)
def test_non_images_are_refused_by_name(data: bytes, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        decode_image(data)


def test_eps_is_not_opened() -> None:
    # Pillow reads EPS by running Ghostscript: not for untrusted bytes.
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


def test_byte_and_pixel_limits_name_the_limit() -> None:
    data = png(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageError, match=f"is {len(data)} bytes; images may be at most 100 bytes"):
        decode_image(data, limits=ImageLimits(max_bytes=100))
    with pytest.raises(ImageError, match="at most 0 megapixels"):
        decode_image(data, limits=ImageLimits(max_pixels=5000))


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = decode_image(buffer.getvalue())
    assert upright.size == (20, 60)
    r, g, b = upright.getpixel((10, 2))  # the red band is now on top
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGBA", (8, 8), (0, 0, 0, 0)),  # transparent: white
        Image.new("LA", (8, 8), (0, 0)),
        Image.new("P", (8, 8), 0),
        Image.new("I;16", (8, 8), 65535),
        Image.new("1", (8, 8), 1),
        Image.new("CMYK", (8, 8), (0, 0, 0, 0)),
    ],
    ids=lambda image: image.mode,
)
def test_every_mode_comes_out_rgb_and_white_stays_white(image: Image.Image) -> None:
    if image.mode == "P":
        image.info["transparency"] = 0
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if image.mode == "CMYK" else "PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.mode == "RGB"
    assert decoded.getpixel((4, 4)) == (255, 255, 255)
