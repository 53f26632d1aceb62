"""Without the `vision` extra (rapidocr/onnxruntime): /v1/ocr and an image part for a text-only
model answer 501 naming the install command, `sorai ocr` says so in one line.

The extra is hidden, not uninstalled: sys.modules[name] = None makes the import of rapidocr (or
of onnxruntime) fail as on an install without it, and a fresh OCR engine forgets any pipeline
already loaded.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from sorai.cli import main
from sorai.vision import ocr
from tests.server.conftest import Served

INSTALL = "pip install 'sorai[vision]'"


@pytest.fixture(params=["rapidocr", "onnxruntime"])
def no_vision_extra(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, request.param, None)
    monkeypatch.setattr(ocr, "_engine", ocr._Engine())


def _png(tmp_path: Path, text: str) -> Path:
    image = Image.new("RGB", (160, 40), "white")
    ImageDraw.Draw(image).text((8, 12), text, fill="black")
    path = tmp_path / "page.png"
    image.save(path)
    return path


def test_the_api_answers_501_naming_the_extra(
    fake: Served, no_vision_extra: None, tmp_path: Path
) -> None:
    assert not ocr.available()
    url = (
        "data:image/png;base64,"
        + base64.b64encode(_png(tmp_path, "no extra 501").read_bytes()).decode()
    )  # a page no earlier test sent: the server's OCR cache does not hold it
    response = httpx.post(f"{fake.url}/v1/ocr", json={"image": url}, headers=fake.headers)
    assert response.status_code == 501
    error = response.json()["error"]
    assert INSTALL in error["message"] and error["code"] == "ocr_unavailable"
    content = [
        {"type": "text", "text": "read it"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    response = httpx.post(
        f"{fake.url}/v1/chat/completions",
        json={"model": fake.model, "messages": [{"role": "user", "content": content}]},
        headers=fake.headers,
    )
    assert response.status_code == 501
    error = response.json()["error"]
    assert INSTALL in error["message"] and error["param"] == "messages.0.content.1.image_url.url"
    # The server keeps serving.
    assert httpx.get(f"{fake.url}/v1/models", headers=fake.headers).status_code == 200


def test_sorai_ocr_says_so_in_one_line(no_vision_extra: None, tmp_path: Path, capsys) -> None:
    assert main(["ocr", str(_png(tmp_path, "cli"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and INSTALL in err
