"""Images in requests: image_url parts of /v1/chat/completions, and POST /v1/ocr.

A text-only model reads each image part as a text part: the image's OCR rendering
(sorai/vision/render.py documents it), and the request's system message gains
render.SYSTEM_NOTE. A model with a vision tower (a LLaVA checkpoint) takes the image itself:
the part becomes its image token, and the image goes to the engine (image_inputs).
Sources and sizes follow the server's MediaPolicy (`sorai serve
--allowed-media-dir`, `--allow-image-fetch`); a refused or undecodable image is a 400 naming
the part. Decoding and OCR run in a worker thread, so the event loop keeps serving.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sorai.engine.images import PromptImage
from sorai.errors import ImageError, SoraiError
from sorai.server.body import read_json
from sorai.server.errors import APIError, bad_request
from sorai.server.protocol import ChatMessage, ContentPart
from sorai.server.state import get_state
from sorai.vision import ocr, render, som
from sorai.vision.decode import decode_image
from sorai.vision.sources import MediaPolicy, read_source

router = APIRouter()
results = ocr.ResultCache()  # the server's OCR results, by image bytes


def _read(
    url: str, policy: MediaPolicy, name: str, marks: bool
) -> tuple[ocr.OCRResult, som.MarkedImage | None]:
    data = read_source(url, policy, name)
    image = decode_image(data, name, policy.limits)
    result = results.read(data, image)
    return result, som.mark(image, result) if marks else None


class MarkTable:
    """The marks of a request's images (numbered across them: image 2's first mark follows
    image 1's last), for the response's `set_of_marks`."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, som.Mark]] = []  # (image number, mark)

    def add(self, number: int, marked: som.MarkedImage) -> str:
        """Image `number`'s marks renumbered after those already here; its text rendering."""
        offset = len(self.marks)
        renumbered = [replace(m, number=m.number + offset) for m in marked.marks]
        self.marks += [(number, m) for m in renumbered]
        width, height = marked.image.size
        lines = [
            f"[image {number}: {width}x{height} pixels; its regions are numbered, cite them as [n]]"
        ]
        lines += [m.describe() for m in renumbered] or ["(no regions found)"]
        lines.append(f"[end of image {number}]")
        return "\n".join(lines)

    def response_field(self, answers: list[str]) -> dict[str, Any]:
        """{"marks": [{mark, image, box, kind, text}], "cited": [[n, ...] per choice]}."""
        marks = [m for _, m in self.marks]
        return {
            "marks": [{**m.as_dict(), "image": image} for image, m in self.marks],
            "cited": [[m.number for m in som.cited(a, marks)] for a in answers],
        }

    def response(self, body: BaseModel, answers: list[str]) -> Response:
        """`body` (a chat completion) as JSON with `set_of_marks` added."""
        data = json.loads(body.model_dump_json())
        data["set_of_marks"] = self.response_field(answers)
        return JSONResponse(data)


def _api_error(exc: SoraiError, param: str) -> APIError:
    if isinstance(exc, ImageError):
        return bad_request(str(exc), param=param, code="invalid_image")
    # The OCR engine is missing (the vision extra is not installed).
    return APIError(501, str(exc), type="server_error", param=param, code="ocr_unavailable")


async def render_images(
    policy: MediaPolicy, messages: list[ChatMessage], marks: bool = False
) -> MarkTable | None:
    """Every image part of `messages` replaced, in place, by its OCR rendering (with `marks`:
    its numbered regions, returned in the MarkTable); the system message gains the note
    saying so. APIError 400 for a refused image or too many."""
    found = _image_parts(messages, policy)
    table = MarkTable() if marks else None
    if not found:
        return table
    for number, (i, j, part) in enumerate(found, start=1):
        assert part.image_url is not None
        param = f"messages.{i}.content.{j}.image_url.url"
        try:
            result, marked = await run_in_threadpool(
                _read, part.image_url.url, policy, f"image {number}", marks
            )
        except SoraiError as exc:
            raise _api_error(exc, param) from None
        message = messages[i]
        if table is not None and marked is not None:
            text = table.add(number, marked)
        else:
            question = "\n".join(p.text or "" for p in message.content if p.type == "text")
            positions = part.image_url.detail != "low"
            text = render.render(result, number, question, positions=positions)
        message.content[j] = ContentPart(type="text", text=text)
    _add_system_note(messages)
    return table


def _prompt_image(url: str, policy: MediaPolicy, name: str, encoder: Any) -> PromptImage:
    image = decode_image(read_source(url, policy, name), name, policy.limits)
    return PromptImage.from_pixels(encoder.preprocess(image))


async def image_inputs(
    policy: MediaPolicy, messages: list[ChatMessage], encoder: Any, image_text: str
) -> tuple[PromptImage, ...]:
    """For a model with an image encoder: every image part of `messages` replaced, in place,
    by `image_text` (its image token, which the prompt expands to one per patch), and the
    images, decoded and preprocessed, in order. APIError 400 for a refused image or too many."""
    found = _image_parts(messages, policy)
    images = []
    for number, (i, j, part) in enumerate(found, start=1):
        assert part.image_url is not None
        param = f"messages.{i}.content.{j}.image_url.url"
        try:
            image = await run_in_threadpool(
                _prompt_image, part.image_url.url, policy, f"image {number}", encoder
            )
        except SoraiError as exc:
            raise _api_error(exc, param) from None
        images.append(image)
        messages[i].content[j] = ContentPart(type="text", text=image_text)
    return tuple(images)


def _image_parts(
    messages: list[ChatMessage], policy: MediaPolicy
) -> list[tuple[int, int, ContentPart]]:
    """(message index, part index, part) of every image part; a 400 past the policy's limit."""
    found = [
        (i, j, part)
        for i, message in enumerate(messages)
        if isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if part.type == "image_url"
    ]
    if len(found) > policy.max_images:
        raise bad_request(
            f"the request holds {len(found)} images; at most {policy.max_images} are accepted",
            param="messages",
        )
    return found


def _add_system_note(messages: list[ChatMessage]) -> None:
    first = messages[0]
    if first.role in ("system", "developer"):
        first.content = f"{first.text()}\n{render.SYSTEM_NOTE}".strip()
    else:
        note = f"{render.DEFAULT_SYSTEM} {render.SYSTEM_NOTE}"
        messages.insert(0, ChatMessage(role="system", content=note))


class OCRRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # A data: URL, or a path or URL the server's media policy allows; one or several.
    image: str | list[str] = Field(union_mode="left_to_right")
    marks: bool = False  # Set-of-Mark: also the marked image and the mark -> box table


@router.post("/v1/ocr")
async def create_ocr(request: Request) -> Response:
    state = get_state(request)
    body = await read_json(request, OCRRequest)
    urls = [body.image] if isinstance(body.image, str) else body.image
    policy = state.settings.media
    if not urls or len(urls) > policy.max_images:
        raise bad_request(f"image must name 1 to {policy.max_images} images", param="image")
    data: list[dict[str, Any]] = []
    for k, url in enumerate(urls):
        param = "image" if isinstance(body.image, str) else f"image.{k}"
        try:
            entry = await run_in_threadpool(_ocr_entry, url, policy, f"image {k + 1}", body.marks)
        except SoraiError as exc:
            raise _api_error(exc, param) from None
        data.append(entry)
    return JSONResponse({"object": "list", "data": data})


def _ocr_entry(url: str, policy: MediaPolicy, name: str, marks: bool) -> dict[str, Any]:
    data = read_source(url, policy, name)
    image = decode_image(data, name, policy.limits)
    result = results.read(data, image)
    entry: dict[str, Any] = {"object": "ocr", **result.as_dict()}
    if marks:
        marked = som.mark(image, result)
        entry["marks"] = [m.as_dict() for m in marked.marks]
        entry["marked_image"] = marked.data_url()
    return entry
