"""Images drawn with Pillow for the vision tests: text pages, a receipt, a form.

Fonts: DejaVu for Latin text, Noto Sans/Serif CJK for Japanese (Debian's fonts-noto-cjk, which
.ci/run installs); font() returns None when one is missing, and the tests that need it skip.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONTS = {
    "dejavu-sans": "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "dejavu-serif": "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "dejavu-mono": "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "noto-sans-cjk": "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "noto-serif-cjk": "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
    "noto-sans-cjk-bold": "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
}
JAPANESE_FONTS = ("noto-sans-cjk", "noto-serif-cjk", "noto-sans-cjk-bold")
LATIN_FONTS = ("dejavu-sans", "dejavu-serif", "dejavu-mono")

RECEIPT = [
    ("さくら食堂", None),
    ("2026年3月14日", None),
    ("ラーメン", "¥850"),
    ("餃子", "¥450"),
    ("ビール", "¥600"),
    ("小計", "¥1,900"),
    ("消費税", "¥190"),
    ("合計", "¥2,090"),
    ("お預り", "¥3,000"),
    ("お釣り", "¥910"),
]
RECEIPT_TOTAL = "2,090"

FORM = [
    ("Name", "Hanako Sato"),
    ("Email", "hanako@example.com"),
    ("Phone", "03-1234-5678"),
    ("City", "Osaka"),
]


def font(name: str, size: int) -> ImageFont.FreeTypeFont | None:
    path = FONTS[name]
    if not Path(path).exists():
        return None
    # index 0 of the Noto CJK collections is the Japanese face.
    return ImageFont.truetype(path, size, index=0)


def text_page(
    lines: list[str], font_name: str, size: int, angle: float = 0.0, margin: int = 30
) -> Image.Image:
    """Black text on white, one string a line; `angle` rotates the page (counter-clockwise)."""
    face = font(font_name, size)
    assert face is not None, font_name
    widths = [face.getbbox(line)[2] for line in lines]
    step = int(size * 1.8)
    page = Image.new("RGB", (max(widths) + 2 * margin, step * len(lines) + 2 * margin), "white")
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * step), line, font=face, fill="black")
    if angle:
        page = page.rotate(angle, expand=True, fillcolor="white", resample=Image.BICUBIC)
    return page


def _label_value_page(rows: list[tuple[str, str | None]], font_name: str, size: int) -> Image.Image:
    face = font(font_name, size)
    assert face is not None, font_name
    width, step, margin = 22 * size, int(size * 1.9), 30
    page = Image.new("RGB", (width, step * len(rows) + 2 * margin), "white")
    draw = ImageDraw.Draw(page)
    for i, (label, value) in enumerate(rows):
        y = margin + i * step
        draw.text((margin, y), label, font=face, fill="black")
        if value is not None:
            # Values flush right, as on a till receipt: far from their label.
            draw.text((width - margin - face.getbbox(value)[2], y), value, font=face, fill="black")
    return page


def receipt(font_name: str = "noto-sans-cjk", size: int = 28) -> Image.Image:
    return _label_value_page(RECEIPT, font_name, size)


def form(font_name: str = "dejavu-sans", size: int = 26) -> Image.Image:
    return _label_value_page([(f"{k}:", v) for k, v in FORM], font_name, size)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Invoice 2026-0314: total due $1,284.50",
    "Set-of-Mark prompting grounds answers in regions.",
]
JAPANESE = [
    "吾輩は猫である。名前はまだ無い。",
    "東京都千代田区丸の内一丁目",
    "お問い合わせは平日の午前九時から",
    "カタカナとひらがなと漢字を読む",
]


def ocr_cases(fonts: bool = True) -> list[tuple[str, str, int, float, list[str]]]:
    """(language, font, size, angle, lines) for every page the CER figures cover; only the
    fonts installed here."""
    cases = []
    for language, names, lines in (
        ("en", LATIN_FONTS, ENGLISH),
        ("ja", JAPANESE_FONTS, JAPANESE),
    ):
        for name in names:
            if font(name, 10) is None:
                continue
            for size in (20, 36):
                for angle in (0.0, 5.0, 180.0):
                    cases.append((language, name, size, angle, lines))
    return cases
