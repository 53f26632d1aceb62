"""A LLaVA checkpoint served through the engine (paged KV, scheduler, chunked prefill): batched
greedy tokens equal llava.py's own for each request alone, the prefix cache shares blocks
covering an image only between requests with the same image, and `sorai serve`'s chat API
sends a data: URL image to the vision tower."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sorai.engine.config import EngineConfig
from sorai.engine.images import PromptImage, expand_image_tokens
from sorai.engine.llm import LLM
from sorai.engine.llm_engine import LLMEngine
from sorai.engine.params import SamplingParams
from sorai.errors import SoraiError
from sorai.model.gguf import GGUFFile
from sorai.model.llava import load_llava, preprocess
from sorai.model.tokenizer import Tokenizer
from sorai.server.app import create_app
from sorai.server.state import ServerSettings
from tests.server.harness import ServerThread
from tests.vision import tiny_llava


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, default_gguf: Path) -> Path:
    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(default_gguf).metadata)
    return tiny_llava.write(tmp_path_factory.mktemp("tiny-llava"), tokenizer)


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> LLMEngine:
    # Blocks of 4 tokens and 12-token steps: every 16-token image span crosses both.
    config = EngineConfig(block_size=4, num_blocks=128, max_num_batched_tokens=12)
    return LLMEngine.from_model(checkpoint, dtype="float32", config=config)


def _prompt(engine: LLMEngine, text: str) -> list[int]:
    encoder = engine.image_encoder
    ids = engine.tokenizer.encode(text)
    return expand_image_tokens(ids, encoder.image_token_index, encoder.tokens_per_image)


def _run(engine: LLMEngine, jobs: dict[str, tuple[list[int], tuple[PromptImage, ...]]]) -> dict:
    for request_id, (ids, images) in jobs.items():
        params = SamplingParams(
            max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, images=images
        )
        engine.add_request(request_id, ids, params)
    tokens: dict[str, list[int]] = {k: [] for k in jobs}
    while engine.has_work():
        for output in engine.step():
            for choice in output.choices:
                tokens[output.request_id] += choice.token_ids
    return tokens


def test_batched_requests_with_images_match_llava_alone(engine: LLMEngine, checkpoint) -> None:
    reference = load_llava(checkpoint)
    encoder = engine.image_encoder
    images = [PromptImage.from_pixels(encoder.preprocess(tiny_llava.picture(s))) for s in (1, 2)]
    ids_a = _prompt(engine, "Look: <filename> what is it?")
    ids_b = _prompt(engine, "Two words first, then <filename> and a question")
    got = _run(engine, {"a": (ids_a, (images[0],)), "b": (ids_b, (images[1],))})
    want_a = reference.greedy(ids_a, images[0].pixels[None], NEW_TOKENS)
    want_b = reference.greedy(ids_b, images[1].pixels[None], NEW_TOKENS)
    assert got == {"a": want_a, "b": want_b}
    # The image matters: the same text with the other image answers otherwise.
    assert reference.greedy(ids_a, images[1].pixels[None], NEW_TOKENS) != want_a

    # Prefix cache: the same image and text again reuses every block but the last; another
    # image at the same positions reuses only the blocks before the image.
    image_start = ids_a.index(encoder.image_token_index)
    before = engine.stats().prefix_cache_hits
    again = _run(engine, {"a2": (ids_a, (images[0],))})
    hits_same = engine.stats().prefix_cache_hits - before
    assert again["a2"] == want_a
    assert hits_same == (len(ids_a) - 1) // 4 * 4
    before = engine.stats().prefix_cache_hits
    other = _run(engine, {"a3": (ids_a, (images[1],))})
    hits_other = engine.stats().prefix_cache_hits - before
    assert hits_other == image_start // 4 * 4
    assert other["a3"] == reference.greedy(ids_a, images[1].pixels[None], NEW_TOKENS)


def test_image_tokens_must_match_the_images(engine: LLMEngine) -> None:
    ids = _prompt(engine, "no image token here")
    encoder = engine.image_encoder
    image = PromptImage.from_pixels(encoder.preprocess(tiny_llava.picture(3)))
    with pytest.raises(SoraiError, match="image tokens"):
        engine.check_request(ids, SamplingParams(images=(image,)))


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[ServerThread]:
    from sorai.engine.async_engine import AsyncEngine

    engine = AsyncEngine(LLMEngine.from_model(checkpoint, dtype="float32", config=EngineConfig()))
    settings = ServerSettings(served_model_names=("tiny-llava",), embedding_model=None)
    thread = ServerThread(create_app(engine, settings)).start()
    yield thread
    thread.stop()


def test_the_server_sends_a_data_url_image_to_the_vision_tower(served, checkpoint) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    card = client.models.retrieve("tiny-llava")
    assert card.model_extra["input_modalities"] == ["text", "image"]
    png = io.BytesIO()
    tiny_llava.picture(4).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    content = [{"type": "text", "text": "What is this?"}, image_part(url)]
    reply = client.chat.completions.create(
        model="tiny-llava",
        messages=[{"role": "user", "content": content}],
        max_tokens=NEW_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    # The reference: the same rendered prompt (the image part is its image token, one per
    # patch) through llava.py on the same pixels.
    reference = load_llava(checkpoint)
    tokenizer = Tokenizer.from_dir(checkpoint)
    messages = [{"role": "user", "content": f"What is this?\n{tiny_llava.IMAGE_TEXT}"}]
    ids = expand_image_tokens(
        tokenizer.encode_chat(messages), tokenizer.token_to_id(tiny_llava.IMAGE_TEXT), 16
    )
    pixels = preprocess(tiny_llava.picture(4), tiny_llava.IMAGE_SIZE)[None]
    want = reference.greedy(ids, pixels, NEW_TOKENS)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == tokenizer.decode(want)
    # A broken image is a 400 naming the part, as for a text-only model.
    content[1] = image_part(
        "data:image/png;base64," + base64.b64encode(png.getvalue()[:60]).decode()
    )
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="tiny-llava", messages=[{"role": "user", "content": content}], max_tokens=2
        )
    assert error.value.body["param"] == "messages.0.content.1.image_url.url"


def test_llm_chat_takes_pil_images(engine: LLMEngine, checkpoint: Path) -> None:
    llm = LLM(engine)  # sorai.load's facade, over this module's engine
    picture = tiny_llava.picture(5)
    content = [{"type": "text", "text": "What is this?"}, {"type": "image", "image": picture}]
    got = llm.chat(
        [{"role": "user", "content": content}],
        max_tokens=NEW_TOKENS,
        temperature=0,
        ignore_eos=True,
    )
    messages = [{"role": "user", "content": f"What is this?\n{tiny_llava.IMAGE_TEXT}"}]
    ids = expand_image_tokens(llm.encode_chat(messages), engine.image_encoder.image_token_index, 16)
    pixels = preprocess(picture, tiny_llava.IMAGE_SIZE)[None]
    want = load_llava(checkpoint).greedy(ids, pixels, NEW_TOKENS)
    assert got.token_ids == want
    assert got.prompt_tokens == len(ids)


# llava-hf/llava-1.5-*-hf's template: it loops over typed content parts (images first, then
# texts) and renders a plain string content as nothing.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<filename>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_template_over_typed_parts_renders_text_and_images(checkpoint: Path, tmp_path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(LLAVA_15_TEMPLATE)
    tokenizer = Tokenizer.from_dir(tmp_path)
    tokenizer.image_text = tiny_llava.IMAGE_TEXT  # as the loader sets it for a LLaVA
    messages = [
        {"role": "user", "content": f"What is this?\n{tiny_llava.IMAGE_TEXT}"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And its colour?"},
    ]
    rendered = tokenizer.apply_chat_template(messages)
    assert rendered == (
        "USER: <filename>\nWhat is this? ASSISTANT: A cat. USER: And its colour? ASSISTANT:"
    )
