"""`sorai ocr` and `sorai som` through sorai.cli.main, and `sorai serve`'s media flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sorai.cli import build_parser, main
from sorai.errors import SoraiError
from sorai.vision.command import media_policy
from tests.vision.rendered import FORM, form

pytest.importorskip("rapidocr", reason="the vision extra (rapidocr) is not installed")


def test_ocr_and_som_at_the_command_line(tmp_path: Path, capsys) -> None:
    form().save(tmp_path / "form.png")
    assert main(["ocr", str(tmp_path / "form.png")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "Name:  " + dict(FORM)["Name"]
    argv = ["som", str(tmp_path / "form.png"), "--json", "--answer", "It is [4], not [40]."]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert Path(record["marked_image"]) == tmp_path / "form_marks.png"
    assert (tmp_path / "form_marks.png").stat().st_size > 0
    assert record["marks"][1]["text"] == dict(FORM)["Name"]
    assert [m["mark"] for m in record["references"]] == [4]
    assert record["references"][0]["text"] == dict(FORM)["Email"]


def test_an_upside_down_form_is_marked_turned(tmp_path: Path, capsys) -> None:
    form().rotate(180).save(tmp_path / "form.png")
    assert main(["som", str(tmp_path / "form.png"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["marks"][1]["text"] == dict(FORM)["Name"]  # marks on the turned page
    # The boxes are on the turned page, where the first row is at the top.
    height = Image.open(tmp_path / "form_marks.png").height
    assert record["marks"][0]["box"][3] < height / 3


def test_errors_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    assert main(["ocr", str(tmp_path / "missing.png")]) == 2
    assert main(["ocr", str(tmp_path / "a.svg")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "SVG (vector) image" in err


def test_serve_media_flags(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--allowed-media-dir", str(tmp_path), "--allow-image-fetch", "--max-images", "2"]
    )
    policy = media_policy(args)
    assert policy.allowed_dirs == (tmp_path.resolve(),) and policy.allow_fetch
    assert policy.max_images == 2
    with pytest.raises(SoraiError, match="--max-images must be >= 1, got 0"):
        media_policy(parser.parse_args(["serve", "--max-images", "0"]))
    with pytest.raises(SoraiError, match="is not a directory"):
        media_policy(parser.parse_args(["serve", "--allowed-media-dir", str(tmp_path / "x")]))
