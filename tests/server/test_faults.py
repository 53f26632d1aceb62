"""Server faults over the scripted engine: the per-request time limit and the shutdown grace
period end a request with an error in OpenAI's shape (a stream: a final error event and
[DONE]) and abort its engine request.

The engine is scripted (tests/server/fake_engine.py) so a request runs exactly as long as the
test says; the real engine's timeout, and SIGTERM on a real `sorai serve`, are tested in
test_api_live.py and test_serve_cli.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx2
import pytest

from tests.server.conftest import Served
from tests.server.fake_engine import FakeEngine

# Runs for 200 scripted steps: far longer than any limit below.
LONG = {"model": "fake-model", "prompt": "Once", "max_tokens": 200, "ignore_eos": True}


@pytest.fixture
def slow(fake: Served, fake_engine: FakeEngine) -> Iterator[FakeEngine]:
    fake_engine.step_delay = 0.05
    yield fake_engine
    fake.state.settings.request_timeout = None
    running = fake.state.running
    running.stopping, running.refusal = False, None


def events(fake: Served, body: dict) -> list:
    response = httpx2.post(
        fake.url + "/v1/completions", json={**body, "stream": True}, headers=fake.headers
    )
    assert response.status_code == 200
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def wait_until_idle(engine: FakeEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.01)


def test_request_timeout(fake: Served, slow: FakeEngine) -> None:
    fake.state.settings.request_timeout = 0.3
    response = httpx2.post(fake.url + "/v1/completions", json=LONG, headers=fake.headers)
    assert response.status_code == 408
    assert response.headers["x-should-retry"] == "false"  # the openai client must not resend
    error = response.json()["error"]
    assert error["code"] == "request_timeout" and "0.3 s" in error["message"]
    wait_until_idle(slow)
    assert not slow.active  # the engine request was aborted

    received = events(fake, LONG)
    assert received[-1] == "[DONE]"
    assert received[-2]["error"]["code"] == "request_timeout"
    assert any(event["choices"][0]["text"] for event in received[:-2])
    wait_until_idle(slow)
    assert not slow.active


def test_shutdown_grace_ends_running_streams_with_an_error_event(
    fake: Served, slow: FakeEngine
) -> None:
    # What the server does on SIGTERM (sorai/server/serve.py), with a 0.3 s grace period.
    running = fake.state.running
    slow.loop.call_soon_threadsafe(running.begin_shutdown, 0.3)
    received = events(fake, LONG)
    assert received[-1] == "[DONE]"
    error = received[-2]["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    assert "0.3 s grace period" in error["message"]
    wait_until_idle(slow)
    assert not slow.active
    # A request arriving after the grace period (on a kept-alive connection) is refused.
    response = httpx2.post(fake.url + "/v1/completions", json=LONG, headers=fake.headers)
    assert response.status_code == 503 and "shutting down" in response.json()["error"]["message"]
