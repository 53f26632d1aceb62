"""`sorai serve --adapter NAME=PATH --adapter-dir DIR`: adapters served unmerged, loaded and
unloaded at runtime with vLLM's endpoints, over a real server (a subprocess) and the default
model; the official openai client and httpx drive it."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sorai import hub
from sorai.engine.llm import LLM
from tests.engine.lora_files import EIGHT, write_adapter
from tests.server.test_serve_cli import URL_LINE, Process

KEY = "lora-key"
BASE = hub.DEFAULT_MODEL
PROMPT = "Three facts about the moon:"


@pytest.fixture(scope="module")
def adapters(default_llm: LLM, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five adapters of different ranks and targets (B large enough to change greedy text);
    `faq` is given with --adapter, the rest wait outside the adapter dir."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {"faq": EIGHT[4], "b": EIGHT[1], "c": EIGHT[2], "d": EIGHT[6], "e": EIGHT[0]}
    return {
        name: write_adapter(root / name, default_llm.model, spec, seed=i, std=0.3)
        for i, (name, spec) in enumerate(specs.items())
    }


@pytest.fixture(scope="module")
def server(
    adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    watched = tmp_path_factory.mktemp("watched")
    process = Process(
        "-m", BASE, "--port", "0", "--api-key", KEY, "--adapter", f"faq={adapters['faq']}",
        "--adapter-dir", str(watched), "--max-loras", "2", "--max-num-seqs", "8",
        "--embedding-model", "none",
    )  # fmt: skip
    try:
        match = process.wait_for(URL_LINE)
        yield match.group(2), watched
    finally:
        process.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)


def greedy(url: str, model: str, max_tokens: int = 8) -> str:
    completion = client(url).completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0
    )
    return completion.choices[0].text


def post(url: str, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url.removesuffix("/v1") + path, json=body, headers=headers, timeout=60)


def test_adapters_load_serve_and_unload_at_runtime(
    server: tuple[str, Path], adapters: dict[str, Path]
) -> None:
    url, watched = server
    models = {m.id: m for m in client(url).models.list().data}
    faq = models[f"{BASE}+faq"]
    assert (faq.parent, faq.root) == (BASE, str(adapters["faq"]))
    base_text, faq_text = greedy(url, BASE), greedy(url, f"{BASE}+faq")
    assert faq_text != base_text

    # Loaded at runtime under another name: the same weights give the same text.
    body = {"lora_name": "again", "lora_path": str(adapters["faq"])}
    assert post(url, "/v1/load_lora_adapter", body, key=None).status_code == 401
    assert post(url, "/v1/load_lora_adapter", body).status_code == 200
    assert greedy(url, f"{BASE}+again") == faq_text
    refused = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(watched)})
    assert refused.status_code == 400 and "not a PEFT adapter directory" in refused.text
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "again"}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="'faq'|faq"):
        greedy(url, f"{BASE}+again")

    # Copied into the watched directory: the first request naming it finds it.
    shutil.copytree(adapters["b"], watched / "b")
    assert greedy(url, f"{BASE}+b") not in (base_text,)
    assert greedy(url, BASE) == base_text  # the base is untouched by all of it


def test_the_responses_api_runs_under_the_adapter_it_names(server: tuple[str, Path]) -> None:
    """/v1/responses prepares its request as chat does: `BASE+faq` runs the adapter."""
    url, _ = server
    messages = [{"role": "user", "content": PROMPT}]

    def chat(model: str) -> str:
        reply = client(url).chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0
        )
        return reply.choices[0].message.content

    def respond(model: str) -> str:
        reply = client(url).responses.create(
            model=model, input=PROMPT, max_output_tokens=8, temperature=0, store=False
        )
        return reply.output_text

    assert respond(f"{BASE}+faq") == chat(f"{BASE}+faq") != chat(BASE) == respond(BASE)


@pytest.mark.slow  # the fast tier has the Python API's (tests/engine/test_multi_lora.py)
def test_structured_output_logprobs_n_and_stream_under_an_adapter(
    server: tuple[str, Path],
) -> None:
    url, _ = server
    model = f"{BASE}+faq"
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 20}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    chat = client(url).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        logprobs=True,
        top_logprobs=2,
        n=2,
        max_tokens=40,
        seed=1,
    )
    assert chat.model == model and len(chat.choices) == 2
    for choice in chat.choices:
        assert set(json.loads(choice.message.content)) == {"answer"}
        assert choice.logprobs.content and len(choice.logprobs.content[0].top_logprobs) == 2
    stream = client(url).completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == greedy(url, model)


def _kv_blocks_used(url: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    return float(re.search(r"^sorai_kv_cache_blocks_used (\S+)$", text, re.M).group(1))


@pytest.mark.slow
def test_fifty_requests_while_adapters_load_and_unload(
    server: tuple[str, Path], adapters: dict[str, Path]
) -> None:
    """Requests over five adapters and the base (two slots: adapters keep being evicted and
    reloaded) while one adapter is unloaded and loaded again: only requests naming it while
    it is gone may fail, with a 404 or 400 naming it; afterwards every KV block is free.
    (Texts are not compared with each request's alone: prompts computed in one step share a
    dense GEMM whose sums follow its row count, see sorai.model.quant.linear.)"""
    url, _ = server
    for name in ("c", "d", "e"):
        body = {"lora_name": name, "lora_path": str(adapters[name])}
        assert post(url, "/v1/load_lora_adapter", body).status_code == 200
    names = [BASE, *(f"{BASE}+{n}" for n in ("faq", "c", "d", "e"))]
    failures: list[str] = []
    lock = threading.Lock()
    rng = random.Random(0)
    jobs = [rng.choice(names) for _ in range(50)]

    def worker(mine: list[str]) -> None:
        for model in mine:
            try:
                text = greedy(url, model, max_tokens=6)
            except (openai.NotFoundError, openai.BadRequestError) as exc:
                if not model.endswith("+e") or "'e'" not in str(exc) and "+e" not in str(exc):
                    with lock:
                        failures.append(f"{model}: {exc}")
                continue
            if not text:
                with lock:
                    failures.append(f"{model}: no text")

    threads = [threading.Thread(target=worker, args=(jobs[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for _ in range(3):
        time.sleep(0.5)
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "e"}).status_code == 200
        time.sleep(0.5)
        body = {"lora_name": "e", "lora_path": str(adapters["e"])}
        assert post(url, "/v1/load_lora_adapter", body).status_code == 200
    for thread in threads:
        thread.join()
    assert not failures
    assert _kv_blocks_used(url) == 0
