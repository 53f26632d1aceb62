"""OCR on Pillow-rendered English and Japanese pages: character error rate bounds, reading
order, boxes and confidences. benchmarks/bench_ocr.py prints the full table."""

from __future__ import annotations

import pytest

from sorai.vision.decode import decode_image
from sorai.vision.ocr import OCRResult, TextLine, read_text, reading_rows
from sorai.vision.quality import character_error_rate
from tests.vision.rendered import ENGLISH, JAPANESE, font, ocr_cases, png, text_page

pytest.importorskip("rapidocr", reason="the vision extra (rapidocr) is not installed")
needs_cjk = pytest.mark.skipif(
    font("noto-sans-cjk", 10) is None, reason="fonts-noto-cjk is not installed (see .ci/run)"
)
CER_BOUND = 0.02  # measured 0.000 on every upright, 5- and 180-degree page (docs/vision.md)


def test_character_error_rate() -> None:
    assert character_error_rate("abcd", "abcd") == 0
    assert character_error_rate("ab cd", "abcd") == 0  # whitespace is not counted
    assert character_error_rate("abcd", "abxd") == 0.25
    assert character_error_rate("abcd", "") == 1
    assert character_error_rate("合計金額", "合計全額") == 0.25


def test_an_english_page_reads_in_order_with_boxes() -> None:
    result = read_text(decode_image(png(text_page(ENGLISH, "dejavu-serif", 28))))
    assert result.orientation == 0
    assert character_error_rate("".join(ENGLISH), result.text()) <= CER_BOUND
    assert result.text().splitlines()[0] == ENGLISH[0]
    tops = [line.box[1] for line in result.lines]
    assert tops == sorted(tops)
    for line in result.lines:
        assert 0.8 < line.confidence <= 1
        left, top, right, bottom = line.box
        assert 0 <= left < right <= result.width and 0 <= top < bottom <= result.height


@needs_cjk
def test_a_rotated_japanese_page_reads_within_the_bound() -> None:
    page = text_page(JAPANESE, "noto-serif-cjk", 28, angle=5)
    result = read_text(decode_image(png(page)))
    assert character_error_rate("".join(JAPANESE), result.text()) <= CER_BOUND


@pytest.mark.parametrize(
    ("lines", "name"),
    [(ENGLISH, "dejavu-sans"), pytest.param(JAPANESE, "noto-sans-cjk", marks=needs_cjk)],
    ids=["en", "ja"],
)
def test_an_upside_down_page_is_turned_and_read(lines: list[str], name: str) -> None:
    # Before the page was turned: CER 0.64 (en) and 0.97 (ja), lines bottom to top.
    result = read_text(decode_image(png(text_page(lines, name, 24, angle=180))))
    assert result.orientation == 180
    assert result.as_dict()["orientation"] == 180
    assert character_error_rate("".join(lines), result.text()) <= CER_BOUND
    assert result.text().splitlines()[0] == lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ocr_cases(), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}px-{c[3]:g}deg")
def test_every_font_size_and_rotation(case) -> None:
    language, name, size, angle, lines = case
    result = read_text(decode_image(png(text_page(lines, name, size, angle))))
    assert character_error_rate("".join(lines), result.text()) <= CER_BOUND
    assert result.orientation == (180 if angle == 180 else 0)


def _line(text: str, box: tuple[int, int, int, int]) -> TextLine:
    left, top, right, bottom = box
    return TextLine(text, 1.0, box, ((left, top), (right, top), (right, bottom), (left, bottom)))


def test_reading_order_pairs_a_label_with_the_value_beside_it() -> None:
    value = _line("¥2,090", (300, 102, 380, 128))  # a little lower than its label
    label = _line("合計", (20, 100, 80, 126))
    title = _line("さくら食堂", (20, 10, 200, 40))
    rows = reading_rows([value, label, title])
    assert [[ln.text for ln in row] for row in rows] == [["さくら食堂"], ["合計", "¥2,090"]]
    assert OCRResult(400, 140, [value, label, title]).text() == "さくら食堂\n合計  ¥2,090"
