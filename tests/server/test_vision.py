"""Images in the API: the receipt question and form extraction over rendered images with the
default model (read through OCR), POST /v1/ocr, and a clear 400 for every bad image."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from sorai.server import vision
from sorai.vision.sources import MediaPolicy
from tests.server.conftest import Served
from tests.vision.rendered import FORM, RECEIPT_TOTAL, font, form, png, receipt
from tests.vision.test_decode import SVG, bomb_png

pytest.importorskip("rapidocr", reason="the vision extra (rapidocr) is not installed")
needs_cjk = pytest.mark.skipif(
    font("noto-sans-cjk", 10) is None, reason="fonts-noto-cjk is not installed (see .ci/run)"
)


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@needs_cjk
def test_the_receipt_total_through_the_api(live: Served) -> None:
    question = "この領収書の合計金額は？"
    answer = live.client().chat.completions.create(
        model=live.model,
        messages=[
            {
                "role": "user",
                "content": [
                    image_part(data_url(png(receipt()))),
                    {"type": "text", "text": question},
                ],
            }
        ],
        temperature=0,
        max_tokens=40,
    )
    text = answer.choices[0].message.content
    assert RECEIPT_TOTAL in text, text
    # The image was read as text: the prompt holds the receipt's rows, not a few tokens.
    assert answer.usage.prompt_tokens > 150


@pytest.mark.slow
def test_form_fields_under_a_json_schema(live: Served) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "phone": {"type": "string"}},
        "required": ["name", "phone"],
        "additionalProperties": False,
    }
    answer = live.client().chat.completions.create(
        model=live.model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Fill in the name and phone from this form."},
                    image_part(data_url(png(form()))),
                ],
            }
        ],
        response_format={"type": "json_schema", "json_schema": {"name": "form", "schema": schema}},
        temperature=0,
        max_tokens=60,
    )
    record = json.loads(answer.choices[0].message.content)
    assert record == {"name": dict(FORM)["Name"], "phone": dict(FORM)["Phone"]}


def test_ocr_endpoint_reads_lines_and_needs_the_key(live: Served) -> None:
    body = {"image": data_url(png(form())), "marks": True}
    assert httpx.post(live.url + "/v1/ocr", json=body).status_code == 401
    response = httpx.post(live.url + "/v1/ocr", json=body, headers=live.headers, timeout=120)
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]
    texts = [line["text"] for line in result["lines"]]
    assert texts[:2] == ["Name:", dict(FORM)["Name"]]
    first = result["lines"][0]
    assert first["confidence"] > 0.9 and len(first["box"]) == 4
    assert result["orientation"] == 0  # upright: read as it is
    assert result["text"].splitlines()[0] == "Name:  " + dict(FORM)["Name"]
    # Set-of-Mark: one mark per line (a form has no other regions), and the marked image.
    assert [m["text"] for m in result["marks"]] == texts
    assert [m["box"] for m in result["marks"]] == [line["box"] for line in result["lines"]]
    assert result["marked_image"].startswith("data:image/png;base64,")
    # The same bytes again (a conversation resends its image each turn): OCR is not rerun.
    hits = vision.results.hits
    again = httpx.post(live.url + "/v1/ocr", json=body, headers=live.headers, timeout=120)
    assert again.json() == response.json()
    assert vision.results.hits == hits + 1


# -- bad images: a 400 each, and the server goes on serving ----------------------------------


@pytest.fixture
def media_dir(fake: Served, tmp_path: Path) -> Iterator[Path]:
    """The fake server allows local images from tmp_path/media for one test."""
    (tmp_path / "media").mkdir()
    settings = fake.state.settings
    before = settings.media
    settings.media = MediaPolicy(allowed_dirs=(tmp_path / "media",))
    yield tmp_path / "media"
    settings.media = before


def test_bad_images_are_a_clear_400_each(fake: Served, media_dir: Path) -> None:
    (media_dir.parent / "secret.png").write_bytes(png(Image.new("RGB", (4, 4))))
    truncated = png(Image.effect_noise((64, 64), 50).convert("RGB"))[:300]
    cases = {
        "truncated PNG": (data_url(truncated), "could not be decoded"),
        "100-megapixel bomb": (data_url(bomb_png()), "10000x10000 pixels"),
        "SVG": (data_url(SVG, "image/svg+xml"), "SVG (vector) image"),
        "outside the allowed dirs": (str(media_dir.parent / "secret.png"), "outside the allowed"),
        "http with fetching off": ("http://127.0.0.1:9/a.png", "fetching image URLs is off"),
    }
    client = fake.client()
    for case, (url, words) in cases.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": [image_part(url)]}],
                max_tokens=2,
            )
        error = caught.value.body
        assert words in error["message"], (case, error)
        assert error["param"] == "messages.0.content.0.image_url.url", case
        assert error["code"] == "invalid_image", case
    # Still serving.
    reply = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content is not None


def test_too_many_images_are_refused(fake: Served) -> None:
    parts = [image_part("data:image/png;base64,AAAA")] * 9
    with pytest.raises(openai.BadRequestError, match="holds 9 images; at most 8"):
        fake.client().chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": parts}], max_tokens=2
        )


@pytest.mark.slow
def test_set_of_marks_maps_the_answers_reference_back_to_a_box(live: Served) -> None:
    # The answer is held to "[n]" (guided_regex): what is tested is the mapping, not the model.
    answer = live.client().chat.completions.create(
        model=live.model,
        messages=[
            {
                "role": "user",
                "content": [
                    image_part(data_url(png(form()))),
                    {"type": "text", "text": "Which mark is the phone number?"},
                ],
            }
        ],
        temperature=0,
        max_tokens=8,
        extra_body={"set_of_marks": True, "guided_regex": r"\[[1-8]\]"},
    )
    text = answer.choices[0].message.content
    extra = answer.model_extra["set_of_marks"]
    marks = {m["mark"]: m for m in extra["marks"]}
    assert [marks[n]["text"] for n in sorted(marks)][:2] == ["Name:", dict(FORM)["Name"]]
    assert all(m["image"] == 1 and len(m["box"]) == 4 for m in marks.values())
    assert extra["cited"] == [[int(text.strip("[]"))]]
