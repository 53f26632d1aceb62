"""Set-of-Mark: marks drawn on text lines and objects, the table, [n] mapped back to boxes,
and the text rendering a text-only model reads."""

from __future__ import annotations

from PIL import Image, ImageDraw

from sorai.vision.ocr import OCRResult, TextLine
from sorai.vision.render import render
from sorai.vision.som import mark, object_regions


def _line(text: str, box: tuple[int, int, int, int]) -> TextLine:
    left, top, right, bottom = box
    return TextLine(text, 0.99, box, ((left, top), (right, top), (right, bottom), (left, bottom)))


def _page() -> tuple[Image.Image, OCRResult]:
    """A page with two 'text lines' (grey bars standing in for text: the OCR result is given)
    and two objects, a blue disc and a red square outline."""
    page = Image.new("RGB", (400, 300), "white")
    draw = ImageDraw.Draw(page)
    draw.rectangle((20, 20, 180, 44), fill=(90, 90, 90))
    draw.rectangle((220, 20, 380, 44), fill=(90, 90, 90))
    draw.ellipse((40, 120, 140, 220), fill=(0, 90, 200))
    draw.rectangle((250, 140, 330, 220), outline=(200, 0, 0), width=4)
    lines = [_line("Total", (20, 20, 181, 45)), _line("42.00", (220, 20, 381, 45))]
    return page, OCRResult(400, 300, lines)


def test_objects_are_found_and_text_is_left_out() -> None:
    page, result = _page()
    boxes = object_regions(page, [line.box for line in result.lines])
    assert boxes == [(40, 120, 141, 221), (250, 140, 331, 221)]


def test_marks_table_and_references() -> None:
    page, result = _page()
    marked = mark(page, result)
    assert [(m.number, m.kind, m.text) for m in marked.marks] == [
        (1, "text", "Total"),
        (2, "text", "42.00"),
        (3, "region", ""),
        (4, "region", ""),
    ]
    assert marked.table().splitlines()[2] == "[3] a region at [40, 120, 141, 221]"
    # Drawn: the disc's box outline is coloured where the page was white.
    assert page.getpixel((40, 220)) == (255, 255, 255)
    assert marked.image.getpixel((40, 220)) != (255, 255, 255)
    assert marked.image.size == page.size and marked.png().startswith(b"\x89PNG")
    assert marked.data_url().startswith("data:image/png;base64,iVBOR")
    cited = marked.references("The total [2] is next to [1]; the disc is [3], not [9]. [2]")
    assert [(m.number, m.box) for m in cited] == [
        (2, (220, 20, 381, 45)),
        (1, (20, 20, 181, 45)),
        (3, (40, 120, 141, 221)),
    ]


def test_the_rendering_joins_labels_and_points_at_the_rows_the_question_names() -> None:
    _, result = _page()
    text = render(result, 2, "What is the total?")
    assert text.splitlines() == [
        "[image 2: 400x300 pixels; text read by OCR, one row a line, top to bottom]",
        "(5%,6%) Total: 42.00",
        "The question asks about: Total: 42.00",
        "[end of image 2]",
    ]
    assert render(result, 1, positions=False).splitlines()[1] == "Total: 42.00"
    assert render(OCRResult(10, 10, []), 1) == "[image 1: 10x10 pixels; OCR found no text in it]"
