"""OCR: an RGB image -> its text lines, each with a box, a confidence, in reading order.

The engine is rapidocr (the `vision` extra): PP-OCR detection, angle classification and
recognition models shipped inside its wheel (Chinese + English dictionary, which holds the
kana and the common kanji, so Japanese reads too), run on onnxruntime. Nothing is downloaded
at run time. It loads once per process, on first use.

Upside-down pages: rapidocr's text-line angle classifier already runs on every line (it turns
a line it reads as 180 degrees before recognition); when most of a page's lines read as 180,
or some do and the page reads poorly, the whole page is read again turned by 180 degrees, and
the turned reading is kept unless it is less confident. An upright page costs nothing more;
an upside-down one costs a second pass (benchmarks/bench_ocr.py prints both). The result's
`orientation` says which reading was kept.
"""

from __future__ import annotations

import contextlib
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

# Below this mean line confidence, a page with any line read as 180 degrees is read turned too
# (measured: upright rendered pages read at 0.99; upside-down English ones at 0.6-0.8).
DOUBTFUL_CONFIDENCE = 0.9


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
    # Degrees (0 or 180) the image was turned, counter-clockwise, to read it; the boxes are
    # on the turned image (upright(image, result) gives it).
    orientation: int = 0

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
            "orientation": self.orientation,
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
            import onnxruntime  # noqa: F401  (rapidocr imports it only when a model loads)
            from rapidocr import RapidOCR
        except ImportError:
            raise SoraiError(INSTALL_HINT) from None
        ocr = RapidOCR(params={"Global.log_level": "error"})
        # rapidocr logs every call's timings at INFO through its own logger.
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        with contextlib.suppress(AttributeError):  # another rapidocr layout: no orientation
            ocr.text_cls = _AngleRecorder(ocr._load_cls_model())
        return ocr

    def __call__(self, image: Image.Image) -> tuple[Any, list[str]]:
        """rapidocr's output, and the angle label ("0" or "180") of each detected line."""
        with self._lock:
            if self._ocr is None:
                self._ocr = self._load()
            recorder = getattr(self._ocr, "text_cls", None)
            if isinstance(recorder, _AngleRecorder):
                recorder.labels = []
            output = self._ocr(image)
            labels = recorder.labels if isinstance(recorder, _AngleRecorder) else []
            return output, labels


class _AngleRecorder:
    """rapidocr's text-line angle classifier, keeping the labels of its last call (rapidocr's
    output drops them)."""

    def __init__(self, classifier: Any) -> None:
        self.classifier = classifier
        self.labels: list[str] = []

    def __call__(self, images: Any) -> Any:
        result = self.classifier(images)
        self.labels += [str(label) for label, _ in result.cls_res or []]
        return result


_engine = _Engine()


def available() -> bool:
    """Whether the OCR engine can be imported (the vision extra is installed)."""
    try:
        import onnxruntime  # noqa: F401
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
    """The text lines in `image` (RGB, as decode.decode_image gives), in reading order; an
    upside-down page is turned first (see the module's docstring)."""
    image = image.convert("RGB")
    output, labels = _engine(image)
    result = _result(image, output, 0)
    turned_lines = sum(label == "180" for label in labels)
    most = turned_lines * 2 > len(labels)
    # Some lines read as 180 on a poorly read page: the classifier misjudged the others.
    doubtful = turned_lines > 0 and _mean_confidence(result) < DOUBTFUL_CONFIDENCE
    if most or doubtful:
        turned = image.rotate(180)
        second = _result(turned, _engine(turned)[0], 180)
        # The classifier turns each line it reads as 180 before recognition, so when most
        # lines are, both readings may be equally confident, but only the turned page has its
        # lines in reading order; the margin keeps the first reading only where the
        # classifier misjudged an upright page.
        margin = 0.05 if most else 0.0
        if _mean_confidence(second) > _mean_confidence(result) - margin:
            return second
    return result


def upright(image: Image.Image, result: OCRResult) -> Image.Image:
    """`image` turned as `result` read it: the image its boxes are on."""
    return image.rotate(result.orientation) if result.orientation else image


def _mean_confidence(result: OCRResult) -> float:
    lines = result.lines
    # Weighted by length: a page's few long lines outweigh stray one-character boxes.
    chars = sum(len(line.text) for line in lines)
    return sum(line.confidence * len(line.text) for line in lines) / chars if chars else 0.0


def _result(image: Image.Image, output: Any, orientation: int) -> OCRResult:
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
    return OCRResult(image.width, image.height, ordered, orientation)
