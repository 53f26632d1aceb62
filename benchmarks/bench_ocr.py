"""OCR figures: character error rate on Pillow-rendered English and Japanese pages (fonts x
sizes x rotations, with the orientation read_text chose), the time of sorai's OCR
(decode_image + read_text) against rapidocr called directly on the same PNG bytes, and the
time an upside-down page adds (its second, turned pass) against the same page upright;
interleaved, medians."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rapidocr import RapidOCR  # noqa: E402

from sorai.model.hardware import machine  # noqa: E402
from sorai.vision.decode import decode_image  # noqa: E402
from sorai.vision.ocr import read_text  # noqa: E402
from sorai.vision.quality import character_error_rate  # noqa: E402
from tests.vision.rendered import ocr_cases, png, text_page  # noqa: E402


def cpu_line() -> str:
    return f"{machine().describe()}; load {os.getloadavg()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (default: 5)")
    args = parser.parse_args()
    print(cpu_line())

    # -- character error rate ------------------------------------------------------------------
    groups: dict[tuple[str, float], list[float]] = {}
    print(f"{'lang':4} {'font':20} {'size':>4} {'angle':>5} {'CER':>6} {'turned':>6}")
    for language, font, size, angle, lines in ocr_cases():
        page = text_page(lines, font, size, angle)
        result = read_text(decode_image(png(page)))
        cer = character_error_rate("".join(lines), result.text())
        groups.setdefault((language, angle), []).append(cer)
        print(f"{language:4} {font:20} {size:4} {angle:5g} {cer:6.3f} {result.orientation:6}")
    print("mean CER by language and rotation:")
    for (language, angle), values in sorted(groups.items()):
        print(
            f"  {language} {angle:5g} deg: {statistics.mean(values):.4f} over {len(values)} pages"
        )

    # -- speed against rapidocr called directly -------------------------------------------------
    from tests.vision.rendered import ENGLISH, JAPANESE, receipt

    images = {
        "receipt 616x590": png(receipt()),
        "ja page": png(text_page(JAPANESE, "noto-sans-cjk", 28)),
    }
    direct = RapidOCR(params={"Global.log_level": "error"})
    for name, data in images.items():
        read_text(decode_image(data))  # warm both
        direct(data)
        ours, theirs = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            read_text(decode_image(data))
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            direct(data)
            theirs.append(time.perf_counter() - start)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(
            f"speed {name}: sorai {a * 1000:.0f} ms, rapidocr {b * 1000:.0f} ms, ratio {a / b:.3f}"
        )

    # -- what an upside-down page costs: the same page upright and turned, interleaved ----------
    for name, lines, font in (("en", ENGLISH, "dejavu-sans"), ("ja", JAPANESE, "noto-sans-cjk")):
        upright = png(text_page(lines, font, 28))
        turned = png(text_page(lines, font, 28, 180))
        times: dict[bytes, list[float]] = {upright: [], turned: []}
        for _ in range(args.rounds):
            for data, samples in times.items():
                start = time.perf_counter()
                read_text(decode_image(data))
                samples.append(time.perf_counter() - start)
        a, b = statistics.median(times[upright]), statistics.median(times[turned])
        print(
            f"upside-down {name} page: upright {a * 1000:.0f} ms, turned {b * 1000:.0f} ms "
            f"(+{(b - a) * 1000:.0f} ms, ratio {b / a:.2f})"
        )
    print(cpu_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
