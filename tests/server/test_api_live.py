"""The server over the real AsyncEngine and the real default model, through the openai client.

Small max_tokens throughout so the module stays short on a 2-core CPU; nothing here depends on
how fast the machine is (waits poll for a state with a generous deadline).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx2
import openai
import pytest

from sorai.model.tokenizer import Tokenizer
from tests.server.conftest import Served

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Who wrote Hamlet?",
    "What is photosynthesis?",
    "Say hello in Spanish.",
    "What is the largest planet?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Translate 'cat' into French.",
    "What does a bee make?",
    "Name a famous painter.",
    "What is the opposite of cold?",
    "How many days are in a week?",
]


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def scrape(live: Served) -> dict[str, float]:
    """/metrics as {series: value} (labels kept in the key)."""
    text = httpx2.get(live.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_idle(live: Served, timeout: float = 60.0) -> dict[str, float]:
    """Metrics once nothing runs or waits and every KV block is free (or the deadline passes)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(live)
        idle = (
            metrics["sorai_num_requests_running"] == 0
            and metrics["sorai_num_requests_waiting"] == 0
            and metrics["sorai_kv_cache_blocks_used"] == 0
        )
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def test_chat_greedy_usage_and_length(live: Served, tokenizer: Tokenizer) -> None:
    messages = ask(QUESTIONS[0])
    reply = live.client().chat.completions.create(
        model=live.model,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    assert reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    assert choice.message.content and choice.message.role == "assistant"


def test_chat_stops_on_its_own(live: Served) -> None:
    reply = live.client().chat.completions.create(
        model=live.model, messages=ask(QUESTIONS[0]), max_tokens=40, temperature=0
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 40


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_text_equals_whole_text(live: Served, endpoint: str) -> None:
    client = live.client()
    options = {"model": live.model, "max_tokens": 12, "temperature": 0}
    if endpoint == "chat":
        create = client.chat.completions.create
        options["messages"] = ask(QUESTIONS[5])
    else:
        create = client.completions.create
        options["prompt"] = "The three primary colours are"
    whole = create(**options)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **options))
    usage = chunks[-1].usage
    pieces = [c.choices[0] for c in chunks if c.choices]
    if endpoint == "chat":
        text = "".join(p.delta.content or "" for p in pieces)
        expected = whole.choices[0].message.content
    else:
        text = "".join(p.text for p in pieces)
        expected = whole.choices[0].text
    assert text == expected
    assert [p.finish_reason for p in pieces if p.finish_reason] == [whole.choices[0].finish_reason]
    # (cached_tokens may differ: the first request filled the prefix cache for the second.)
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


def test_n_choices(live: Served) -> None:
    reply = live.client().chat.completions.create(
        model=live.model,
        messages=ask("Tell me a fun fact."),
        max_tokens=5,
        n=3,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 15


def test_completions_prompt_list_numbering(live: Served) -> None:
    client = live.client()
    prompts = ["The sky is", "Water boils at"]
    options = {"model": live.model, "max_tokens": 4, "temperature": 0}
    reply = client.completions.create(prompt=prompts, n=2, **options)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(prompt=prompt, **options).choices[0].text
        # Greedy: both choices of a prompt are that prompt's own answer.
        assert reply.choices[2 * i].text == reply.choices[2 * i + 1].text == alone


def test_chat_logprobs(live: Served) -> None:
    reply = live.client().chat.completions.create(
        model=live.model,
        messages=ask(QUESTIONS[4]),
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        # Greedy picks the most likely token, so it heads its own top list.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_completion_logprobs(live: Served) -> None:
    reply = live.client().completions.create(
        model=live.model, prompt="One, two, three,", max_tokens=4, temperature=0, logprobs=2
    )
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for i, token in enumerate(lp.tokens):
        assert token in lp.top_logprobs[i] and len(lp.top_logprobs[i]) <= 3
        assert lp.token_logprobs[i] <= 0
        if i:
            assert lp.text_offset[i] - lp.text_offset[i - 1] == len(lp.tokens[i - 1])


def test_engine_checks_are_400(live: Served) -> None:
    client = live.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=live.model, messages=ask("hi"), max_tokens=9000)
    message = info.value.body["message"]
    assert "9000" in message and str(live.engine.context_length) in message
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(
            model=live.model, messages=ask("hi"), max_tokens=2, logit_bias={"60000": 5}
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=ask("hi"), max_tokens=2)


def test_logit_bias_steers(live: Served, tokenizer: Tokenizer) -> None:
    token = tokenizer.encode(" banana")[0]
    reply = live.client().completions.create(
        model=live.model,
        prompt="My favourite fruit is",
        max_tokens=2,
        temperature=0,
        logit_bias={str(token): 100},
    )
    assert reply.choices[0].text.startswith(" banana")


def test_stop_string(live: Served) -> None:
    options = {"model": live.model, "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0}
    plain = live.client().completions.create(**options).choices[0].text
    assert " 6," in plain  # the model counts on
    stopped = live.client().completions.create(stop=[" 6"], **options).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == plain[: plain.index(" 6")]


def test_api_key_required(live: Served) -> None:
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="nope").chat.completions.create(
            model=live.model, messages=ask("hi"), max_tokens=1
        )
    assert httpx2.get(live.url + "/health").status_code == 200


def test_tokenize_matches_usage(live: Served) -> None:
    messages = ask(QUESTIONS[2])
    headers = live.headers
    tokens = httpx2.post(
        live.url + "/tokenize", json={"messages": messages}, headers=headers
    ).json()
    assert tokens["max_model_len"] == live.engine.context_length
    reply = live.client().chat.completions.create(model=live.model, messages=messages, max_tokens=1)
    assert tokens["count"] == reply.usage.prompt_tokens
    text = httpx2.post(
        live.url + "/detokenize", json={"tokens": tokens["tokens"]}, headers=headers
    ).json()
    assert QUESTIONS[2] in text["prompt"]


async def _chat_all(live: Served, requests: list[dict]) -> list[str]:
    async with live.async_client() as client:
        replies = await asyncio.gather(
            *(client.chat.completions.create(model=live.model, **r) for r in requests)
        )
    return [r.choices[0].message.content for r in replies]


def test_batch_invariance(live: Served) -> None:
    """16 concurrent greedy requests answer exactly what each answers alone."""
    requests = [
        {"messages": ask(q), "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
        for q in QUESTIONS
    ]
    client = live.client()
    alone = [
        client.chat.completions.create(model=live.model, **r).choices[0].message.content
        for r in requests
    ]
    together = asyncio.run(_chat_all(live, requests))
    assert together == alone


def test_seeded_sampling_under_concurrency(live: Served) -> None:
    seeded = {
        "messages": ask("Invent a name for a cat."),
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 1234,
        "extra_body": {"ignore_eos": True},
    }
    alone = asyncio.run(_chat_all(live, [seeded]))[0]
    noise = [
        {
            "messages": ask(q),
            "max_tokens": 8,
            "temperature": 1.0,
            "extra_body": {"ignore_eos": True},
        }
        for q in QUESTIONS[:6]
    ]
    mixed = asyncio.run(_chat_all(live, [seeded, *noise, seeded, seeded]))
    assert mixed[0] == mixed[-1] == mixed[-2] == alone
    other_seed = asyncio.run(_chat_all(live, [{**seeded, "seed": 99}]))[0]
    assert other_seed != alone


def test_no_leaks_after_disconnects(live: Served) -> None:
    """50 requests, 20 of them dropped mid-stream: every KV block is free again afterwards."""
    client = live.client()
    errors: list[BaseException] = []
    done = []

    def complete(i: int) -> None:
        try:
            reply = client.chat.completions.create(
                model=live.model, messages=ask(QUESTIONS[i % 16]), max_tokens=4, temperature=0
            )
            done.append(reply.choices[0].finish_reason)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def drop(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=live.model,
                messages=ask(QUESTIONS[i % 16] + " Explain at length."),
                max_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for n, _ in enumerate(stream):
                if n == 2:
                    break
            stream.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    jobs = [drop if i % 5 in (1, 3) else complete for i in range(50)]
    assert jobs.count(drop) == 20
    threads = []
    for i, job in enumerate(jobs):
        threads.append(threading.Thread(target=job, args=(i,)))
        threads[-1].start()
        if len(threads) % 10 == 0:  # ten at a time keeps the 2-core box responsive
            for t in threads[-10:]:
                t.join()
    for t in threads:
        t.join()
    assert not errors
    assert len(done) == 30
    metrics = wait_idle(live)
    assert metrics["sorai_kv_cache_blocks_used"] == 0
    assert metrics["sorai_num_requests_running"] == 0
    assert metrics['sorai_requests_finished_total{finish_reason="abort"}'] >= 20
    reply = client.chat.completions.create(
        model=live.model, messages=ask("hi"), max_tokens=2, temperature=0
    )
    assert reply.choices[0].message.content


def test_prefix_cache_reports_cached_tokens(live: Served, tokenizer: Tokenizer) -> None:
    prefix = " ".join(f"Fact {i}: the number {i} comes after {i - 1}." for i in range(1, 40))
    assert len(tokenizer.encode(prefix)) >= 256
    client = live.client()
    options = {"model": live.model, "max_tokens": 1, "temperature": 0}
    first = client.completions.create(prompt=prefix + " Question one?", **options)
    second = client.completions.create(prompt=prefix + " Another question?", **options)
    assert first.usage.prompt_tokens >= 256
    assert second.usage.prompt_tokens_details.cached_tokens >= 240


def test_metrics_after_traffic(live: Served) -> None:
    for _ in range(2):  # the second one hits the prefix cache
        live.client().chat.completions.create(
            model=live.model, messages=ask("hi"), max_tokens=3, temperature=0
        )
    metrics = wait_idle(live)
    assert metrics["sorai_kv_cache_blocks_total"] > 0
    assert 0 <= metrics["sorai_kv_cache_usage_ratio"] <= 1
    assert metrics["sorai_generation_tokens_total"] > 0
    assert metrics["sorai_prompt_tokens_total"] > 0
    assert metrics["sorai_prefix_cache_hits_total"] > 0
    assert 0 < metrics["sorai_prefix_cache_hit_rate"] <= 1
    assert "sorai_num_preemptions_total" in metrics
    finished = sum(v for k, v in metrics.items() if k.startswith("sorai_requests_finished_total"))
    assert finished > 0
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert metrics[f"sorai_{name}_seconds_count"] > 0
    assert metrics["sorai_e2e_request_latency_seconds_sum"] > 0


def test_lone_disconnect_frees_blocks(live: Served) -> None:
    """The only request in flight dropped mid-stream: its blocks are freed with nothing else
    running to move the engine along."""
    wait_idle(live)
    stream = live.client().chat.completions.create(
        model=live.model,
        messages=ask("Describe the ocean in detail."),
        max_tokens=300,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for n, _ in enumerate(stream):
        if n == 3:
            break
    assert scrape(live)["sorai_kv_cache_blocks_used"] > 0
    stream.close()
    metrics = wait_idle(live, timeout=30)
    assert metrics["sorai_kv_cache_blocks_used"] == 0
    assert metrics["sorai_num_requests_running"] == 0


def test_prompt_longer_than_one_step(live: Served, tokenizer: Tokenizer) -> None:
    """A prompt past max_num_batched_tokens is prefilled over several steps."""
    prompt = " ".join(f"Line {i} of a long document about rivers." for i in range(80))
    assert len(tokenizer.encode(prompt)) > 512
    reply = live.client().completions.create(
        model=live.model, prompt=prompt, max_tokens=2, temperature=0
    )
    assert reply.usage.prompt_tokens > 512 and reply.usage.completion_tokens == 2


JAPANESE = [{"role": "user", "content": "日本の首都はどこですか？日本語で答えてください。"}]


@pytest.mark.slow
def test_japanese_streams_never_split_a_character(live: Served) -> None:
    """At every max_tokens from 1 to 40 (some cut a character in the middle of its bytes), the
    stream has no U+FFFD and joins to the whole answer's text."""

    async def both(client: openai.AsyncOpenAI, max_tokens: int) -> tuple[str, list[str]]:
        options = dict(model=live.model, messages=JAPANESE, max_tokens=max_tokens, temperature=0)
        whole = await client.chat.completions.create(**options)
        stream = await client.chat.completions.create(**options, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return whole.choices[0].message.content or "", pieces

    async def run() -> list[tuple[str, list[str]]]:
        client = live.async_client()
        return await asyncio.gather(*(both(client, k) for k in range(1, 41)))

    answers = asyncio.run(run())
    assert any(ord(ch) > 0x3000 for ch in answers[-1][0])  # the answer is Japanese
    for max_tokens, (whole, pieces) in enumerate(answers, start=1):
        assert "\ufffd" not in whole, (max_tokens, whole)
        assert not any("\ufffd" in piece for piece in pieces), (max_tokens, pieces)
        assert "".join(pieces) == whole, max_tokens
    # Greedy: each answer is the next one's beginning (a cut character only held back).
    assert all(b.startswith(a) for (a, _), (b, _) in zip(answers, answers[1:], strict=False))


def test_request_timeout_stops_and_frees_the_request(live: Served) -> None:
    """A request past --request-timeout ends with a 408 (a stream: a final error event), and
    the engine request is aborted: its KV blocks are freed."""
    wait_idle(live)
    settings = live.state.settings
    settings.request_timeout = 1.0
    options = dict(
        model=live.model,
        messages=ask("Describe the ocean in detail."),
        max_tokens=4000,
        extra_body={"ignore_eos": True},
    )
    try:
        with pytest.raises(openai.APIStatusError) as info:
            live.client().chat.completions.create(**options)
        assert info.value.status_code == 408
        assert info.value.body["code"] == "request_timeout"
        assert "time limit of 1 s" in info.value.body["message"]
        received = []
        with pytest.raises(openai.APIError, match="time limit of 1 s"):
            for chunk in live.client().chat.completions.create(**options, stream=True):
                received.append(chunk)
        assert received  # the stream ran until the limit, then the error event came
    finally:
        settings.request_timeout = None
    metrics = wait_idle(live, timeout=30)
    assert metrics["sorai_kv_cache_blocks_used"] == 0
    assert metrics["sorai_num_requests_running"] == 0
