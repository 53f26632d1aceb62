"""Set-of-Mark: numbered marks on an image's regions, the mark -> box table, and `[n]` in a
model's answer mapped back to boxes.

Regions are the OCR text boxes (reading order) and, for what is not text, the connected regions
of pixels that differ from the background (OpenCV's connected components: OpenCV comes with the
OCR engine), largest first, small specks and regions mostly covered by text left out.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sorai.vision.ocr import Box, OCRResult, upright

MAX_MARKS = 60
MIN_REGION_FRACTION = 0.002  # of the image's area: smaller blobs are specks, not objects
_REFERENCE = re.compile(r"\[(\d{1,3})\]")
_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


@dataclass(frozen=True)
class Mark:
    number: int
    box: Box  # left, top, right, bottom in the original image's pixels
    kind: Literal["text", "region"]
    text: str = ""  # a text mark's OCR text

    def as_dict(self) -> dict[str, Any]:
        return {"mark": self.number, "box": list(self.box), "kind": self.kind, "text": self.text}

    def describe(self) -> str:
        what = repr(self.text) if self.kind == "text" else "a region"
        return f"[{self.number}] {what} at {list(self.box)}"


@dataclass
class MarkedImage:
    image: Image.Image  # the input with the marks drawn
    marks: list[Mark]

    def table(self) -> str:
        """One mark a line, '[n] 'text' at [l, t, r, b]' or '[n] a region at [...]'."""
        return "\n".join(m.describe() for m in self.marks)

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()

    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png()).decode("ascii")

    def references(self, answer: str) -> list[Mark]:
        """The marks `answer` cites as [n] (see cited())."""
        return cited(answer, self.marks)


def cited(answer: str, marks: list[Mark]) -> list[Mark]:
    """The marks `answer` cites as [n], in the order first cited; numbers with no mark (a
    model inventing [99]) are left out."""
    by_number = {m.number: m for m in marks}
    seen: dict[int, Mark] = {}
    for match in _REFERENCE.finditer(answer):
        number = int(match.group(1))
        if number in by_number and number not in seen:
            seen[number] = by_number[number]
    return list(seen.values())


def _covered(box: Box, by: list[Box]) -> float:
    """The largest fraction of `box` that one box of `by` covers."""
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1)
    best = 0
    for o in by:
        w = min(box[2], o[2]) - max(box[0], o[0])
        h = min(box[3], o[3]) - max(box[1], o[1])
        if w > 0 and h > 0:
            best = max(best, w * h)
    return best / area


def object_regions(image: Image.Image, text_boxes: list[Box], limit: int = MAX_MARKS) -> list[Box]:
    """Boxes of connected non-background regions, largest first, text left out."""
    import cv2

    grey = np.asarray(image.convert("L"), dtype=np.int16)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = int(np.median(border))
    mask = (np.abs(grey - background) > 40).astype(np.uint8)
    for left, top, right, bottom in text_boxes:
        mask[top:bottom, left:right] = 0
    # Close small gaps, so an outlined shape or a dashed border is one region.
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    smallest = MIN_REGION_FRACTION * image.width * image.height
    boxes = []
    for left, top, width, height, area in stats[1:count]:
        if area < smallest:
            continue
        box = (int(left), int(top), int(left + width), int(top + height))
        if _covered(box, text_boxes) < 0.5:
            boxes.append((int(area), box))
    boxes.sort(reverse=True)
    return [box for _, box in boxes[:limit]]


def mark(image: Image.Image, result: OCRResult, limit: int = MAX_MARKS) -> MarkedImage:
    """`image` with numbered marks on its text lines, then on its other regions; an image the
    OCR read upside down is turned first, as its boxes are."""
    image = upright(image, result)
    marks = [
        Mark(n, line.box, "text", line.text) for n, line in enumerate(result.lines[:limit], start=1)
    ]
    for box in object_regions(image, [m.box for m in marks], limit - len(marks)):
        marks.append(Mark(len(marks) + 1, box, "region"))
    return MarkedImage(_draw(image, marks), marks)


def _draw(image: Image.Image, marks: list[Mark]) -> Image.Image:
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    size = max(12, min(out.width, out.height) // 40)
    font: Any = (
        ImageFont.truetype(_FONT, size) if Path(_FONT).exists() else ImageFont.load_default(size)
    )
    for m in marks:
        colour = _COLOURS[m.number % len(_COLOURS)]
        draw.rectangle(m.box, outline=colour, width=max(2, size // 8))
        label = str(m.number)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        x, y = m.box[0], max(0, m.box[1] - (bottom - top) - 4)
        draw.rectangle((x, y, x + right - left + 6, y + bottom - top + 4), fill=colour)
        draw.text((x + 3 - left, y + 2 - top), label, fill=(255, 255, 255), font=font)
    return out
