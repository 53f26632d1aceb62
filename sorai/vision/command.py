"""`sorai ocr` and `sorai som` at the command line, and `sorai serve`'s media flags.

OCR runs in this process (no server, no language model): the vision extra's engine loads on
the first image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sorai.errors import SoraiError
from sorai.vision.decode import MAX_BYTES, MAX_PIXELS, ImageLimits, decode_image
from sorai.vision.sources import MAX_IMAGES, MediaPolicy

OCR_DESCRIPTION = """\
Read the text in images (PNG, JPEG, GIF, WebP, BMP, TIFF) with the bundled OCR engine
(PP-OCR models on onnxruntime: English, Chinese, and Japanese kana and kanji). Prints each
image's text, one row a line in reading order; --json prints its lines with boxes
[left, top, right, bottom] in pixels and confidences.

examples:
  sorai ocr receipt.png
  sorai ocr --json form.png scan.jpg
"""

SOM_DESCRIPTION = """\
Set-of-Mark: draw numbered marks on an image's regions (its text lines, then the other
connected regions), write the marked image, and print the mark -> box table. A model shown the
table (or the marked image) can answer with [n] references; --answer maps them back to boxes.

examples:
  sorai som screenshot.png -o marked.png
  sorai som form.png --json --answer "The name field is [2]."
"""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SoraiError(f"cannot read {path!r}: {exc.strerror}") from None


def cmd_ocr(args: argparse.Namespace) -> int:
    from sorai.vision.ocr import read_text

    results = []
    for path in args.images:
        result = read_text(decode_image(_read(path), repr(path)))
        if args.json:
            results.append({"image": path, **result.as_dict()})
        else:
            if len(args.images) > 1:
                print(f"== {path}")
            if result.orientation:
                print(f"({path}: upside down, read turned 180 degrees)", file=sys.stderr)
            print(result.text())
    if args.json:
        json.dump(results if len(results) > 1 else results[0], sys.stdout, ensure_ascii=False)
        print()
    return 0


def cmd_som(args: argparse.Namespace) -> int:
    from sorai.vision.ocr import read_text
    from sorai.vision.som import mark

    image = decode_image(_read(args.image), repr(args.image))
    marked = mark(image, read_text(image))
    output = args.output or str(Path(args.image).with_suffix("")) + "_marks.png"
    marked.image.save(output)
    cited = marked.references(args.answer) if args.answer else None
    if args.json:
        record = {"image": args.image, "marked_image": output}
        record["marks"] = [m.as_dict() for m in marked.marks]
        if cited is not None:
            record["references"] = [m.as_dict() for m in cited]
        json.dump(record, sys.stdout, ensure_ascii=False)
        print()
        return 0
    print(marked.table())
    print(f"marked image: {output}", file=sys.stderr)
    if cited is not None:
        print("answer cites:")
        print("\n".join(m.describe() for m in cited) or "(no mark)")
    return 0


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    ocr = verbs.add_parser(
        "ocr", help="read the text in images", description=OCR_DESCRIPTION, formatter_class=raw
    )
    ocr.add_argument("images", nargs="+", metavar="IMAGE")
    ocr.add_argument("--json", action="store_true", help="lines with boxes and confidences")
    ocr.set_defaults(run=cmd_ocr)

    som = verbs.add_parser(
        "som",
        help="number an image's regions (Set-of-Mark)",
        description=SOM_DESCRIPTION,
        formatter_class=raw,
    )
    som.add_argument("image", metavar="IMAGE")
    som.add_argument(
        "-o", "--output", default=None, help="the marked PNG (default: IMAGE_marks.png)"
    )
    som.add_argument("--answer", default=None, help="a model's answer whose [n] to map to boxes")
    som.add_argument("--json", action="store_true", help="the table (and references) as JSON")
    som.set_defaults(run=cmd_som)


def add_media_args(parser: argparse.ArgumentParser) -> None:
    """`sorai serve`'s flags for image parts in requests."""
    group = parser.add_argument_group("images in requests (read through OCR)")
    group.add_argument(
        "--allowed-media-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="image parts may name local files (file:// or a path) under DIR (repeatable; "
        "default: none, only data: URLs)",
    )
    group.add_argument(
        "--allow-image-fetch",
        action="store_true",
        help="image parts may be http(s) URLs, which the server fetches (default: off)",
    )
    group.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_PIXELS,
        metavar="N",
        help="decoded pixels per image (default: %(default)s)",
    )
    group.add_argument(
        "--max-image-bytes",
        type=int,
        default=MAX_BYTES,
        metavar="N",
        help="encoded bytes per image (default: %(default)s)",
    )
    group.add_argument(
        "--max-images",
        type=int,
        default=MAX_IMAGES,
        metavar="N",
        help="image parts per request (default: %(default)s)",
    )


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    for flag, value in (
        ("--max-image-pixels", args.max_image_pixels),
        ("--max-image-bytes", args.max_image_bytes),
        ("--max-images", args.max_images),
    ):
        if value < 1:
            raise SoraiError(f"{flag} must be >= 1, got {value}")
    return MediaPolicy(
        allowed_dirs=tuple(Path(d) for d in args.allowed_media_dir or ()),
        allow_fetch=args.allow_image_fetch,
        max_images=args.max_images,
        limits=ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels),
    )
