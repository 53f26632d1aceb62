"""An image as text, for a model that reads only text: the OCR rows in reading order.

The rendering of image n (1-based, in the order the request's image parts come):

    [image n: WxH pixels; text read by OCR, one row a line, top to bottom]
    (x%,y%) label: value
    (x%,y%) a line of text
    The question asks about: label: value       <- for each row the question names
    [end of image n]

A row's pieces (text side by side on one line of the image) are joined as "label: value"
when there are two of them and the first is a short label, else with two spaces. (x%,y%)
is where the row starts, in percent of the width and height (left, top = 0). The rows whose
label occurs in the question are repeated at the end: the 135M default model copies the total
from a receipt's rendering only when the row it needs is pointed at (docs/vision.md has the
figures). SYSTEM_NOTE goes into the system message of a request whose images were rendered.
"""

from __future__ import annotations

import re

from sorai.vision.ocr import OCRResult, TextLine

MAX_LABEL_CHARS = 24
SYSTEM_NOTE = "Images are given as the text read from them."
DEFAULT_SYSTEM = "You are a helpful assistant."
_WORD = re.compile(r"[A-Za-z]{3,}")


def _row_text(row: list[TextLine]) -> tuple[str | None, str]:
    """(label, text) of a row: label is set when the row is 'label  value'."""
    if len(row) == 2 and len(row[0].text) <= MAX_LABEL_CHARS:
        label = row[0].text.rstrip(":：").strip()
        if label:
            return label, f"{label}: {row[1].text}"
    return None, "  ".join(line.text for line in row)


def _names(label: str, question: str) -> bool:
    """Whether the question mentions the label: the whole label in it (Japanese has no spaces),
    or, for Latin text, one of the label's words."""
    if len(label) >= 2 and label in question:
        return True
    words = {w.lower() for w in _WORD.findall(question)}
    return any(w.lower() in words for w in _WORD.findall(label))


def render(result: OCRResult, number: int, question: str = "", positions: bool = True) -> str:
    """The text rendering of image `number` (see the module's docstring); `question`: the
    request's text, whose words pick the rows repeated at the end."""
    head = f"[image {number}: {result.width}x{result.height} pixels; "
    rows = result.rows()
    if not rows:
        return head + "OCR found no text in it]"
    out = [head + "text read by OCR, one row a line, top to bottom]"]
    named = []
    for row in rows:
        label, text = _row_text(row)
        if positions:
            x = 100 * row[0].box[0] // max(result.width, 1)
            y = 100 * min(line.box[1] for line in row) // max(result.height, 1)
            out.append(f"({x}%,{y}%) {text}")
        else:
            out.append(text)
        if label is not None and question and _names(label, question):
            named.append(text)
    out.extend(f"The question asks about: {text}" for text in named)
    out.append(f"[end of image {number}]")
    return "\n".join(out)


def image_file_text(path: str, max_bytes: int | None = None) -> str:
    """The rendering (without positions) of the image file at `path`: what the skills'
    `--image` reads, the text a text-only model is given for it."""
    from sorai.errors import ImageError
    from sorai.vision.decode import ImageLimits, decode_image
    from sorai.vision.ocr import read_text

    limits = ImageLimits() if max_bytes is None else ImageLimits(max_bytes=max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read {path!r}: {exc.strerror}") from None
    return render(read_text(decode_image(data, repr(path), limits)), 1, positions=False)
