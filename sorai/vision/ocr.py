"""OCR: an RGB image -> its text lines, each with a box, a confidence, in reading order.

The engine is rapidocr (the `vision` extra): PP-OCR detection, angle classification and
recognition models shipped inside its wheel (Chinese + English dictionary, which holds the
kana and the common kanji, so Japanese reads too), run on onnxruntime. Nothing is downloaded
at run time. It loads once per process, on first use.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sorai.errors import SoraiError

INSTALL_HINT = "OCR needs the vision extra: pip install 'sorai[vision]' (rapidocr, onnxruntime)"

Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class TextLine:
    text: str
    confidence: float  # the recogniser's mean character score, 0..1
    box: Box  # the axis-aligned box around polygon
    polygon: tuple[tuple[int, int], ...]  # the detector's four corners, clockwise from top-left

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "confidence": round(self.confidence, 4),
            "box": list(self.box),
            "polygon": [list(p) for p in self.polygon],
        }


@dataclass(frozen=True)
class OCRResult:
    width: int
    height: int
    lines: list[TextLine]  # in reading order: rows top to bottom, left to right within a row

    def rows(self) -> list[list[TextLine]]:
        """The lines grouped into rows (lines side by side), each row left to right."""
        return reading_rows(self.lines)

    def text(self) -> str:
        """The text: one row a line, the pieces of a row separated by two spaces."""
        return "\n".join("  ".join(line.text for line in row) for row in self.rows())

    def as_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "text": self.text(),
            "lines": [line.as_dict() for line in self.lines],
        }


def reading_rows(lines: list[TextLine]) -> list[list[TextLine]]:
    """Lines grouped into rows, top to bottom: a line joins a row when its vertical middle
    lies inside the row's first line (a label and the value printed beside it); left to
    right within a row."""
    rows: list[list[TextLine]] = []
    for line in sorted(lines, key=lambda ln: (ln.box[1] + ln.box[3]) / 2):
        middle = (line.box[1] + line.box[3]) / 2
        for row in rows:
            first = row[0]
            if first.box[1] <= middle <= first.box[3]:
                row.append(line)
                break
        else:
            rows.append([line])
    rows = [sorted(row, key=lambda ln: ln.box[0]) for row in rows]
    rows.sort(key=lambda row: min(ln.box[1] for ln in row))
    return rows


class _Engine:
    """The rapidocr pipeline, loaded on first use; one image at a time (the ONNX sessions use
    every core already, and rapidocr keeps per-call state)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ocr: Any = None

    def _load(self) -> Any:
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise SoraiError(INSTALL_HINT) from None
        ocr = RapidOCR(params={"Global.log_level": "error"})
        # rapidocr logs every call's timings at INFO through its own logger.
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        return ocr

    def __call__(self, image: Image.Image) -> Any:
        with self._lock:
            if self._ocr is None:
                self._ocr = self._load()
            return self._ocr(image)


_engine = _Engine()


def available() -> bool:
    """Whether the OCR engine can be imported (the vision extra is installed)."""
    try:
        import rapidocr  # noqa: F401
    except ImportError:
        return False
    return True


class ResultCache:
    """The last `size` OCR results by the SHA-256 of the image's bytes: a conversation sends
    its image again with every turn, and OCR is the slow part of reading it."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.hits = 0
        self._lock = threading.Lock()
        self._results: OrderedDict[str, OCRResult] = OrderedDict()

    def read(self, data: bytes, image: Image.Image) -> OCRResult:
        """read_text(image), or the result kept for the same `data` (image's encoded bytes)."""
        key = hashlib.sha256(data).hexdigest()
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                self.hits += 1
                return self._results[key]
        result = read_text(image)
        with self._lock:
            self._results[key] = result
            while len(self._results) > self.size:
                self._results.popitem(last=False)
        return result


def read_text(image: Image.Image) -> OCRResult:
    """The text lines in `image` (RGB, as decode.decode_image gives), in reading order."""
    output = _engine(image.convert("RGB"))
    lines = []
    if output.boxes is not None and output.txts is not None:
        for quad, text, score in zip(output.boxes, output.txts, output.scores, strict=True):
            polygon = tuple((int(round(x)), int(round(y))) for x, y in quad)
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            box = (
                max(0, min(xs)),
                max(0, min(ys)),
                min(image.width, max(xs)),
                min(image.height, max(ys)),
            )
            lines.append(TextLine(str(text), float(score), box, polygon))
    ordered = [line for row in reading_rows(lines) for line in row]
    return OCRResult(image.width, image.height, ordered)
