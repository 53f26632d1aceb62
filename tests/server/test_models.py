"""Several models in one server (server/models.py): two tiny random Llamas of the cache (same
tokenizer, different weights, so their greedy answers differ), the first served as the server's
own, the second loaded when a request names it and unloaded after its keep-alive."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

import sorai
from sorai import hub, registry
from sorai.engine.async_engine import AsyncEngine
from sorai.engine.config import EngineConfig
from sorai.errors import SoraiError
from sorai.model.scratch import write_random_model
from sorai.server.app import create_app
from sorai.server.models import ModelPool, parse_keep_alive
from sorai.server.state import ServerSettings
from tests.server.harness import ServerThread

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
CONFIG = EngineConfig(kv_cache_gib=0.01, max_num_seqs=4)
GREEDY = {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}


def load(name: str) -> AsyncEngine:
    return AsyncEngine.from_model(name, config=CONFIG, quantize="none")


@dataclass
class Cache:
    home: Path
    paths: dict[str, Path]


@pytest.fixture(scope="module")
def cache(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cache]:
    """tiny-a, tiny-b and tiny-c registered in a registry of their own (the cache's models)."""
    home = tmp_path_factory.mktemp("home")
    paths = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORAI_REGISTRY", str(home / "registry.json"))
        for seed, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
            paths[name] = write_random_model(
                default_gguf, tmp_path_factory.mktemp(name), seed=seed, **SHAPE
            )
            entry = registry.Entry(
                name, registry.MODEL, "safetensors", str(paths[name]), "test", owned=False
            )
            registry.put(home, entry)
        yield Cache(home, paths)


@dataclass
class Served:
    pool: ModelPool
    client: openai.OpenAI


@pytest.fixture(scope="module")
def served(cache: Cache) -> Iterator[Served]:
    """tiny-a as the server's own; room for one more, loaded on demand."""
    pool = ModelPool(load, lambda name: 0, max_models=2, keep_alive=300.0)
    settings = ServerSettings(embedding_model=None, models=pool)
    thread = ServerThread(create_app(load("tiny-a"), settings)).start()
    client = openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0)
    yield Served(pool, client)
    thread.stop()


def answer(client: openai.OpenAI, model: str, **extra) -> tuple[str, str]:
    reply = client.completions.create(
        model=model, prompt="The sea is", **GREEDY | {"extra_body": GREEDY["extra_body"] | extra}
    )
    return reply.model, reply.choices[0].text


def wait_until(condition, seconds: float = 30.0) -> bool:
    # Unloading runs in the background; only its having happened is checked, not how fast.
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_cached_model_loads_on_demand_answers_and_unloads(served: Served, cache: Cache) -> None:
    ids = {m.id: m for m in served.client.models.list().data}
    assert "tiny-a" in ids and ids["tiny-b"].model_extra.get("loaded") is False

    # Each model answers with its own weights: as that model loaded alone does.
    alone = sorai.load(cache.paths["tiny-b"], quantize="none")
    expected = alone.generate("The sea is", max_tokens=6, temperature=0, ignore_eos=True).text
    model, text = answer(served.client, "tiny-b", keep_alive=0)
    assert (model, text) == ("tiny-b", expected)
    assert answer(served.client, "tiny-a")[1] != expected
    # keep_alive 0: unloaded once its request is over; the first model stays.
    assert wait_until(lambda: "tiny-b" not in served.pool.loaded)
    assert answer(served.client, "tiny-b")[1] == expected  # and back on the next request
    assert answer(served.client, "hf:tiny-b") == ("hf:tiny-b", expected)  # the same model
    assert "tiny-b" in served.pool.loaded

    with pytest.raises(openai.NotFoundError, match="loads on demand the chat models"):
        answer(served.client, "tiny-z")
    with pytest.raises(openai.BadRequestError, match="keep_alive must be seconds or a duration"):
        answer(served.client, "tiny-b", keep_alive="soon")


def test_a_full_server_evicts_the_idle_model_and_refuses_when_all_are_busy(
    served: Served,
) -> None:
    pool = served.pool
    answer(served.client, "tiny-b", keep_alive="5m")
    assert pool.loaded["tiny-b"].keep_alive == 300
    # tiny-c needs the room tiny-b takes: tiny-b is idle, so it goes.
    assert answer(served.client, "tiny-c")[0] == "tiny-c"
    assert set(pool.loaded) == {"tiny-c"}
    # A stream holds tiny-c: nothing can make room for tiny-b meanwhile.
    stream = served.client.completions.create(
        model="tiny-c", prompt="Hi", stream=True, max_tokens=64, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    with pytest.raises(openai.APIStatusError, match="none is idle and unpinned") as refused:
        answer(served.client, "tiny-b")
    assert refused.value.status_code == 503
    stream.close()
    assert wait_until(lambda: pool.loaded["tiny-c"].leases == 0)
    assert answer(served.client, "tiny-b")[0] == "tiny-b"
    assert set(pool.loaded) == {"tiny-b"}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), (90, 90.0), ("30", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25),
     (-1, math.inf), ("-1m", math.inf)],
)  # fmt: skip
def test_keep_alive_reads_seconds_and_durations(value: object, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", True, None, "m5"])
def test_a_bad_keep_alive_names_what_would_do(value: object) -> None:
    with pytest.raises(SoraiError, match=r"keep_alive must be seconds or a duration such as '5m'"):
        parse_keep_alive(value)


@pytest.mark.slow  # a real `sorai serve` process with two models (~15 s)
def test_sorai_serve_with_two_models(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.server.test_serve_cli import URL_LINE, Process

    monkeypatch.setenv("SORAI_REGISTRY", str(cache.home / "registry.json"))
    process = Process(
        "-m", str(cache.paths["tiny-a"]), "-m", "tiny-b", "--port", "0", "--quantize", "none",
        "--embedding-model", "none", "--kv-cache-gib", "0.01", "--max-models", "3",
        "--keep-alive", "0", "--pin", "tiny-b",
    )  # fmt: skip
    try:
        url = process.wait_for(URL_LINE).group(2)
        assert any("up to 1 more loaded on demand" in line for line in process.seen)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        listed = {m.id: m.model_extra.get("loaded") for m in client.models.list().data}
        assert listed[str(cache.paths["tiny-a"])] is None and listed["tiny-b"] is None
        assert listed["tiny-c"] is False
        assert answer(client, "tiny-b")[0] == "tiny-b"
        assert answer(client, "tiny-c")[0] == "tiny-c"

        # --keep-alive 0: tiny-c goes after its request; tiny-b is pinned and stays.
        def loaded() -> dict[str, bool | None]:
            return {m.id: m.model_extra.get("loaded") for m in client.models.list().data}

        assert wait_until(lambda: loaded()["tiny-c"] is False)
        assert loaded()["tiny-b"] is None
    finally:
        process.stop()


def test_serve_flag_errors_come_before_anything_loads(sorai_main) -> None:
    bad = sorai_main("serve", "--keep-alive", "soon")
    assert bad.returncode == 2 and "--keep-alive must be seconds or a duration" in bad.stderr
    few = sorai_main("serve", "-m", "smollm2-135m-instruct", "-m", "x/y", "--max-models", "1")
    assert few.returncode == 2
    assert "unknown model 'x/y'" in few.stderr  # every -m is checked first
    two = sorai_main("serve", "-m", hub.DEFAULT_MODEL, "-m", "hf:org/later", "--max-models", "1")
    assert two.returncode == 2 and "--max-models 1 is fewer than the 2 -m models" in two.stderr


def test_an_adapter_of_the_first_model_runs_on_its_engine_beside_the_pool(
    served: Served, cache: Cache, tmp_path: Path
) -> None:
    """`tiny-a+faq` (an adapter loaded at runtime on the server's own model) is not a model of
    the pool: it answers as tiny-a with that adapter does in the Python API."""
    import httpx

    from tests.engine.lora_files import EIGHT, write_adapter

    alone = sorai.load(cache.paths["tiny-a"], quantize="none")
    path = write_adapter(tmp_path / "faq", alone.model, EIGHT[1], seed=3, std=0.3)
    url = str(served.client.base_url).rstrip("/")
    loaded = httpx.post(
        f"{url}/load_lora_adapter", json={"lora_name": "faq", "lora_path": str(path)}
    )
    assert loaded.status_code == 200, loaded.text
    alone.add_adapter("faq", path)
    expected = alone.generate(
        "The sea is", max_tokens=6, temperature=0, ignore_eos=True, adapter="faq"
    ).text
    assert answer(served.client, "tiny-a+faq") == ("tiny-a+faq", expected)
    assert answer(served.client, "tiny-b")[0] == "tiny-b"  # the pool still routes the others
