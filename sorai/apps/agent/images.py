"""Image tools in the TaskMatrix spirit, on Pillow: each reads an image in the workspace and
writes a new one, `image/<id>_<tool>_<parent>.png` (parent: the input's id, or its file name
for an original), so a chain of edits can be read back from the names; the tool returns the
new file's name for the next step (or the answer) to use.

OCR is a seam: `describe_image` reports the text `ocr` finds (a function from a PIL image to
its text): by default sorai's OCR (sorai/vision, the `vision` extra) when it is installed, and
"not available" otherwise. `mark_regions` without boxes numbers the image's regions itself
(Set-of-Mark, sorai/vision/som.py) and returns the mark -> box table with the new file.
"""

from __future__ import annotations

import dataclasses
import io
import uuid
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Annotated

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps, UnidentifiedImageError
from pydantic import Field

from sorai.apps.agent.files import Workspace, paths_in
from sorai.apps.agent.tools import Tool, ToolFailure, tool
from sorai.errors import SoraiError

OUTPUT_DIR = "image"
MAX_SIDE = 8192
MAX_PIXELS = 64 * 10**6  # decoded size refused above this (an RGBA copy is ~256 MB)
MAX_BYTES = 64 * 2**20  # image files read at most
MAX_SCANNED = 5000  # directory entries looked at to find them
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
Pixel = Annotated[int, Field(ge=0, le=MAX_SIDE)]  # bounded: guided decoding stops
ImagePath = Annotated[
    str, Field(description="an image file in the workspace", min_length=1, max_length=500)
]


def _vision_ocr(image: Image.Image) -> str:
    from sorai.vision.ocr import read_text

    return read_text(image.convert("RGB")).text() or "(no text found)"


def _default_ocr() -> Callable[[Image.Image], str] | None:
    from sorai.vision.ocr import available

    return _vision_ocr if available() else None


# PIL image -> the text in it; replace it to use another OCR, None to turn it off.
ocr: Callable[[Image.Image], str] | None = _default_ocr()


def new_name(tool_name: str, parent: str) -> str:
    """image/<id>_<tool>_<parent id>.png; parent ids are the first part of a generated name."""
    stem = PurePosixPath(parent).stem
    parent_id = stem.split("_", 1)[0] if PurePosixPath(parent).parent.name == OUTPUT_DIR else stem
    return f"{OUTPUT_DIR}/{uuid.uuid4().hex[:6]}_{tool_name}_{parent_id}.png"


def _normalised(image: Image.Image) -> Image.Image:
    """16- and 32-bit grey scaled to 8 bits, palettes and CMYK/YCbCr/LAB made RGB(A): the
    filters refuse P and I;16, and PNG cannot hold CMYK."""
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = image.convert("F") if image.mode == "F" else image.convert("I")
        low, high = grey.getextrema()
        top = 65535 if image.mode.startswith("I;16") else high if high > 255 else 255
        scale = 255 / top if top else 1
        return grey.point(lambda v: v * scale).convert("L")
    if image.mode == "1":
        return image.convert("L")
    alpha = "A" in image.getbands() or "transparency" in image.info
    return image.convert("RGBA" if alpha else "RGB")


def _images_in(workspace: Workspace) -> list[str]:
    """The workspace's image files by name (at most files.MAX_OFFERED, originals before edits)."""
    return paths_in(workspace, suffixes=IMAGE_SUFFIXES, scanned=MAX_SCANNED)


def _colour_name(rgb: tuple[int, ...]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb[:3])


def image_tools(workspace: Workspace) -> list[Tool]:
    """describe_image, crop_image, resize_image, rotate_image, grayscale, blur, watercolor and
    mark_regions over images in `workspace`."""

    def load(path: str) -> Image.Image:
        """The image, upright (EXIF orientation applied), in a mode every tool and PNG take:
        L, LA, RGB or RGBA."""
        data = workspace.read_bytes(path, limit=MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ToolFailure(f"{path!r} is larger than {MAX_BYTES // 2**20} MB")
        try:
            image = Image.open(io.BytesIO(data))
            # Checked before decoding: a small file can declare a huge canvas (a
            # decompression bomb); Pillow itself only refuses above ~179 megapixels.
            if image.width * image.height > MAX_PIXELS:
                raise ToolFailure(
                    f"{path!r} is {image.width}x{image.height} pixels, more than the "
                    f"{MAX_PIXELS // 10**6} megapixels the image tools take"
                )
            image.load()
            upright = _normalised(ImageOps.exif_transpose(image))
            upright.info.update(source_mode=image.mode, source_format=image.format)
            return upright
        except UnidentifiedImageError:
            raise ToolFailure(f"{path!r} is not an image Pillow can read") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ToolFailure(f"{path!r} could not be decoded ({e})") from None

    def save(image: Image.Image, tool_name: str, parent: str) -> str:
        name = new_name(tool_name, parent)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        workspace.write_bytes(name, buffer.getvalue())
        return name

    def describe_image(image: ImagePath) -> str:
        """Describe an image: size, mode, dominant colours and (when available) its text."""
        picture = load(image)
        rgb = picture.convert("RGB")
        small = rgb.resize((64, 64)) if rgb.width * rgb.height > 4096 else rgb
        counts = small.quantize(colors=5).convert("RGB").getcolors(4096) or []
        total = sum(n for n, _ in counts) or 1
        colours = ", ".join(
            f"{_colour_name(c)} {100 * n / total:.0f}%" for n, c in sorted(counts, reverse=True)
        )
        text = ocr(picture) if ocr is not None else "OCR not available (no vision model set up)"
        mode, source = picture.info["source_mode"], picture.info["source_format"] or "unknown"
        return (
            f"{image}: {picture.width}x{picture.height} pixels, mode {mode}, format {source}; "
            f"dominant colours: {colours}; text: {text}"
        )

    def crop_image(image: ImagePath, left: Pixel, top: Pixel, right: Pixel, bottom: Pixel) -> str:
        """Crop an image to the box (left, top, right, bottom) in pixels; returns the new file."""
        picture = load(image)
        if not (0 <= left < right <= picture.width and 0 <= top < bottom <= picture.height):
            raise ToolFailure(
                f"the box must lie within the {picture.width}x{picture.height} image with "
                "left < right and top < bottom"
            )
        return save(picture.crop((left, top, right, bottom)), "crop", image)

    def resize_image(
        image: ImagePath,
        width: Annotated[int, Field(ge=1, le=MAX_SIDE)],
        height: Annotated[int, Field(ge=1, le=MAX_SIDE)],
    ) -> str:
        """Resize an image to width x height pixels; returns the new file."""
        return save(load(image).resize((width, height), Image.LANCZOS), "resize", image)

    def rotate_image(image: ImagePath, degrees: Annotated[float, Field(ge=-360, le=360)]) -> str:
        """Rotate an image counter-clockwise by some degrees (the canvas grows to fit)."""
        return save(load(image).rotate(degrees, expand=True), "rotate", image)

    def grayscale(image: ImagePath) -> str:
        """Make an image grayscale; returns the new file."""
        return save(ImageOps.grayscale(load(image)), "grayscale", image)

    def blur(image: ImagePath, radius: Annotated[float, Field(ge=0, le=100)] = 4.0) -> str:
        """Blur an image (Gaussian, radius in pixels); returns the new file."""
        return save(load(image).filter(ImageFilter.GaussianBlur(radius)), "blur", image)

    def watercolor(image: ImagePath) -> str:
        """Repaint an image in a soft, painterly watercolor style; returns the new file."""
        picture = load(image).convert("RGB")
        # Flatten detail into patches of colour, then let darkened edges show through like
        # pigment pooling at a wash's border.
        washed = picture.filter(ImageFilter.MedianFilter(5)).filter(ImageFilter.ModeFilter(5))
        washed = washed.filter(ImageFilter.SMOOTH_MORE).filter(ImageFilter.SMOOTH_MORE)
        washed = ImageEnhance.Color(washed).enhance(1.3)
        edges = ImageOps.invert(picture.convert("L").filter(ImageFilter.FIND_EDGES))
        edges = ImageOps.autocontrast(edges).convert("RGB")
        painted = Image.blend(washed, Image.composite(washed, edges, edges.convert("L")), 0.35)
        return save(ImageEnhance.Brightness(painted).enhance(1.05), "watercolor", image)

    def mark_regions(
        image: ImagePath,
        regions: Annotated[
            list[Annotated[list[Pixel], Field(min_length=4, max_length=4)]] | None,
            Field(
                description="boxes [left, top, right, bottom]; omitted: found automatically "
                "(text lines and other regions)",
                max_length=50,
            ),
        ] = None,
    ) -> str:
        """Draw numbered marks on regions of an image (given boxes, or found: text lines and
        objects); returns the new file and what each number marks."""
        picture = load(image).convert("RGB")
        if not regions:
            from sorai.vision.ocr import read_text
            from sorai.vision.som import mark

            try:
                marked = mark(picture, read_text(picture))
            except SoraiError as e:
                raise ToolFailure(str(e)) from None
            return f"{save(marked.image, 'marks', image)}\n{marked.table() or '(no regions)'}"
        draw = ImageDraw.Draw(picture)
        for number, (left, top, right, bottom) in enumerate(regions, start=1):
            if left >= right or top >= bottom:
                raise ToolFailure(f"region {number}: left < right and top < bottom, please")
            draw.rectangle((left, top, right, bottom), outline=(255, 0, 0), width=3)
            draw.rectangle((left, top, left + 18, top + 16), fill=(255, 0, 0))
            draw.text((left + 4, top + 2), str(number), fill=(255, 255, 255))
        return save(picture, "marks", image)

    def refine(parameters: dict) -> dict:
        names = _images_in(workspace)
        if names:  # none: left open, so the call fails with "no file" rather than not at all
            parameters["properties"]["image"]["enum"] = names
        return parameters

    return [
        dataclasses.replace(tool(f, timeout=60.0), refine=refine)
        for f in (
            describe_image,
            crop_image,
            resize_image,
            rotate_image,
            grayscale,
            blur,
            watercolor,
            mark_regions,
        )
    ]
