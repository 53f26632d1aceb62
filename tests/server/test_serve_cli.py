"""`sorai serve`, and `sorai chat --url` and `generate --url` against it, as real subprocesses:
one server start for the module."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.test_cli import SORAI, assert_user_error, run_sorai

KEY = "serve-test-key"
URL_LINE = re.compile(r"^sorai serving (\S+) at (http://\S+/v1)$")


class Process:
    """A `sorai serve` subprocess whose stdout lines are collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            [*SORAI, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 300.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if match := pattern.match(line):
                return match
        raise AssertionError("server output:\n" + "\n".join(self.seen))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture(scope="module")
def server(default_gguf: Path, default_encoder_dir: Path) -> Iterator[tuple[Process, str, str]]:
    process = Process(
        "--port", "0", "--api-key", KEY, "--served-model-name", "my-model", "--max-num-seqs", "4"
    )
    try:
        match = process.wait_for(URL_LINE)
        yield process, match.group(1), match.group(2)
    finally:
        process.stop()


def test_bad_flags_fail_before_loading(tmp_path: Path) -> None:
    line = assert_user_error(run_sorai("serve", "--api-key-file", str(tmp_path / "missing")))
    assert "missing" in line
    line = assert_user_error(run_sorai("serve", "--port", "70000"))
    assert "--port" in line


def test_bad_embedding_models_fail_before_loading(tmp_path: Path) -> None:
    line = assert_user_error(run_sorai("serve", "--embedding-model", str(tmp_path / "missing")))
    assert "neither a known embedding model nor a path" in line
    line = assert_user_error(run_sorai("serve", "--embedding-model", str(tmp_path)))
    assert "has no modules.json" in line
    line = assert_user_error(run_sorai("serve", "--embedding-model", "smollm2-135m-instruct"))
    assert "is a chat model, not an embedding model" in line
    line = assert_user_error(run_sorai("serve", "--model", "all-minilm-l6-v2"))
    assert "is an embedding model (bert)" in line
    assert "serve it with `sorai serve --embedding-model all-minilm-l6-v2`" in line


def test_serve_and_remote_chat(server: tuple[Process, str, str]) -> None:
    _, name, url = server
    assert name == "my-model"
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    # The default embedding model is served too (loaded on its first request).
    assert [m.id for m in client.models.list().data] == ["my-model", "all-minilm-l6-v2"]
    reply = client.chat.completions.create(
        model="my-model",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    embedded = client.embeddings.create(model="all-minilm-l6-v2", input=["a", "b"])
    assert [len(item.embedding) for item in embedded.data] == [384, 384]

    chat = run_sorai(
        "chat", "--url", url, "--api-key", KEY, "-t", "0", "-n", "12",
        stdin="What is the capital of France?\n",
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == reply.choices[0].message.content
    generate = run_sorai(
        "generate", "--chat", "What is the capital of France?", "--url", url, "--api-key", KEY,
        "-t", "0", "-n", "12",
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.strip() == reply.choices[0].message.content
    env = {**os.environ, "SORAI_API_KEY": "wrong"}
    denied = run_sorai("chat", "--url", url, stdin="hi\n", env=env)
    assert "API key" in assert_user_error(denied)


def test_sigterm_finishes_in_flight_then_exits_0(server: tuple[Process, str, str]) -> None:
    process, _, url = server
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="my-model",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=24,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)
    process.popen.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert process.popen.wait(timeout=120) == 0
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
