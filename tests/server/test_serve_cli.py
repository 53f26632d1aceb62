"""`sorai serve` as a real subprocess (one server start for the module), and `sorai chat --url`
and `generate --url` against it; the flag errors and the clients run in this process
(the `sorai_main` fixture, tests/conftest.py)."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.test_cli import SORAI, assert_user_error

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
        "--port", "0", "--api-key", KEY, "--served-model-name", "my-model", "--max-num-seqs", "4",
        "--shutdown-timeout", "10",
    )  # fmt: skip
    try:
        match = process.wait_for(URL_LINE)
        yield process, match.group(1), match.group(2)
    finally:
        process.stop()


@pytest.fixture
def serve_in_process(sorai_main, monkeypatch: pytest.MonkeyPatch):
    """`sorai serve ARGS` in this process, failing the test if the model starts loading (in
    process a server that started would never return)."""
    from sorai.engine.async_engine import AsyncEngine

    def loads(*args, **kwargs):
        raise AssertionError("the chat model started loading: the error came too late")

    monkeypatch.setattr(AsyncEngine, "from_model", loads)
    return lambda *args: sorai_main("serve", *args)


def test_bad_flags_fail_before_loading(tmp_path: Path, serve_in_process) -> None:
    line = assert_user_error(serve_in_process("--api-key-file", str(tmp_path / "missing")))
    assert "missing" in line
    line = assert_user_error(serve_in_process("--port", "70000"))
    assert "--port" in line
    line = assert_user_error(serve_in_process("--request-timeout", "0"))
    assert "--request-timeout must be a number of seconds > 0" in line
    line = assert_user_error(serve_in_process("--shutdown-timeout", "nan"))
    assert "--shutdown-timeout" in line
    line = assert_user_error(serve_in_process("--kv-cache-dtype", "fp8"))
    assert "kv_cache_dtype must be auto or one of float32, float16, bfloat16, got 'fp8'" in line


def test_a_port_in_use_fails_before_loading(serve_in_process) -> None:
    # Was: the model loaded, then uvicorn's own error and exit 3.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = assert_user_error(serve_in_process("--port", str(port), "--embedding-model", "none"))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line


def test_bad_embedding_models_fail_before_loading(tmp_path: Path, serve_in_process) -> None:
    line = assert_user_error(serve_in_process("--embedding-model", str(tmp_path / "missing")))
    assert "neither a known embedding model nor a path" in line
    line = assert_user_error(serve_in_process("--embedding-model", str(tmp_path)))
    assert "has no modules.json" in line
    line = assert_user_error(serve_in_process("--embedding-model", "smollm2-135m-instruct"))
    assert "is a chat model, not an embedding model" in line
    line = assert_user_error(serve_in_process("--model", "all-minilm-l6-v2"))
    assert "is an embedding model (bert)" in line
    assert "serve it with `sorai serve --embedding-model all-minilm-l6-v2`" in line


def test_the_banner_says_the_servers_openmp_threads_sleep(server) -> None:
    process, _, _ = server
    line = "OpenMP: OMP_WAIT_POLICY=PASSIVE (sorai's choice for serving"
    assert any(seen.startswith(line) for seen in process.seen), process.seen


def test_serve_and_remote_chat(server: tuple[Process, str, str], sorai_main) -> None:
    process, name, url = server
    assert name == "my-model"
    # The banner names the cache's storage dtype: auto stores a float32 model's keys as float32.
    assert any(line.startswith("KV cache: ") and "MiB float32" in line for line in process.seen)
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

    chat = sorai_main(
        "chat", "--url", url, "--api-key", KEY, "-t", "0", "-n", "12",
        stdin="What is the capital of France?\n",
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == reply.choices[0].message.content
    generate = sorai_main(
        "generate", "--chat", "What is the capital of France?", "--url", url, "--api-key", KEY,
        "-t", "0", "-n", "12",
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.strip() == reply.choices[0].message.content
    denied = sorai_main("chat", "--url", url, stdin="hi\n", env={"SORAI_API_KEY": "wrong"})
    assert "API key" in assert_user_error(denied)


def test_sigterm_finishes_in_flight_then_exits_0(server: tuple[Process, str, str]) -> None:
    """A stream that fits the grace period (--shutdown-timeout 10) finishes; one that does not
    gets a final error event before its connection closes (was: a bare close)."""
    process, _, url = server
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)

    def story(max_tokens: int):
        return client.chat.completions.create(
            model="my-model",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=max_tokens,
            stream=True,
            extra_body={"ignore_eos": True},
        )

    chunks = iter(story(12))
    endless = iter(story(8000))  # far more tokens than any machine writes in the grace period
    next(chunks)
    next(endless)
    process.popen.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    with pytest.raises(openai.APIError, match="shutting down"):
        list(endless)
    assert process.popen.wait(timeout=120) == 0
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
