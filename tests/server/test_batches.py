"""/v1/files and /v1/batches, driven by the official openai client against a live server on the
real default model and encoder (its own data directory); the 200-line batch and a batch that
survives a SIGKILL of `sorai serve` are slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sorai import hub
from sorai.engine.llm import LLM
from sorai.server.auth import APIKeys
from sorai.server.state import ServerSettings
from tests.server.conftest import API_KEY, Served, serve_default

DONE = ("completed", "failed", "expired", "cancelled")


def chat_line(i: int, max_tokens: int = 3) -> dict:
    return {
        "custom_id": f"chat-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": hub.DEFAULT_MODEL,
            "messages": [{"role": "user", "content": f"Say the number {i}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def embedding_line(i: int) -> dict:
    return {
        "custom_id": f"emb-{i}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": hub.DEFAULT_EMBEDDING_MODEL, "input": f"sentence {i}"},
    }


def jsonl(lines: list) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 600.0):
    # A deadline only against a hang: the test never depends on how fast lines run.
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in DONE:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)


def results(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def served(
    default_llm: LLM, default_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    settings = ServerSettings(
        api_keys=APIKeys([API_KEY]),
        embedding_model=hub.DEFAULT_EMBEDDING_MODEL,
        data_dir=tmp_path_factory.mktemp("server-data"),
        max_file_bytes=1024 * 1024,
    )
    served = serve_default(default_llm, settings)
    yield served
    served.thread.stop()


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return served.client()


def test_files_upload_list_retrieve_content_delete(client: openai.OpenAI) -> None:
    data = b"hello\n"
    made = client.files.create(file=("notes.txt", data), purpose="user_data")
    assert (made.filename, made.bytes, made.purpose) == ("notes.txt", len(data), "user_data")
    assert made.id in [f.id for f in client.files.list(purpose="user_data")]
    assert client.files.retrieve(made.id).bytes == len(data)
    assert client.files.content(made.id).content == data
    assert client.files.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.txt", data), purpose="fine-tune-nope")  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError) as big:
        client.files.create(file=("big.bin", b"x" * (1024 * 1024 + 1)), purpose="user_data")
    assert big.value.status_code == 413


def test_file_lists_page_by_cursor(client: openai.OpenAI) -> None:
    """limit/after as OpenAI's cursor pages (newest first); an unknown cursor is a 400."""
    made = [client.files.create(file=(f"p{i}.txt", b"x"), purpose="user_data") for i in range(3)]
    first = client.files.list(purpose="user_data", limit=2)
    assert [f.id for f in first.data] == [made[2].id, made[1].id] and first.has_more
    rest = client.files.list(purpose="user_data", limit=2, after=made[1].id)
    assert made[0].id in [f.id for f in rest.data]
    with pytest.raises(openai.BadRequestError, match="no file has the id"):
        client.files.list(after="file-nope")
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.files.list(limit=0)
    for f in made:
        client.files.delete(f.id)


def test_a_batch_mixing_chat_and_embeddings(client: openai.OpenAI) -> None:
    lines: list = [chat_line(i) for i in range(5)] + [embedding_line(i) for i in range(4)]
    lines.insert(3, "{not json")  # line 4
    upload = client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    batch = wait(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed) == (10, 9)
    assert batch.request_counts.failed == 1
    output = results(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in output) == sorted(
        [f"chat-{i}" for i in range(5)] + [f"emb-{i}" for i in range(4)]
    )
    for record in output:
        assert record["response"]["status_code"] == 200 and record["error"] is None
        body = record["response"]["body"]
        if record["custom_id"].startswith("chat"):
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]
        else:
            assert body["object"] == "list" and len(body["data"][0]["embedding"]) == 384
    (error,) = results(client, batch.error_file_id)
    assert error["error"]["line"] == 4 and "line 4" in error["error"]["message"]
    assert batch.id in [b.id for b in client.batches.list()]


def test_batch_errors(client: openai.OpenAI) -> None:
    upload = client.files.create(file=("notes.txt", b"{}\n"), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/moderations",  # type: ignore[arg-type]
            completion_window="24h",
        )


def test_the_batch_command(served: Served, client: openai.OpenAI, sorai_main, tmp_path: Path):
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([chat_line(0, max_tokens=2)]))
    url = ["--url", served.url + "/v1", "--api-key", API_KEY]
    submitted = sorai_main("batch", "submit", str(requests), *url)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    wait(client, batch_id)
    status = sorai_main("batch", "status", batch_id, *url)
    assert status.stdout.strip() == f"{batch_id}: completed, 1/1 lines done"
    output = sorai_main("batch", "results", batch_id, *url)
    assert json.loads(output.stdout)["custom_id"] == "chat-0"
    errors = sorai_main("batch", "results", batch_id, "--errors", *url)
    assert errors.returncode != 0 and "no error file" in errors.stderr
    cancel = sorai_main("batch", "cancel", batch_id, *url)
    assert cancel.returncode != 0 and "409" in cancel.stderr


@pytest.mark.slow
def test_a_200_line_batch(client: openai.OpenAI) -> None:
    lines = [chat_line(i) if i % 2 else embedding_line(i) for i in range(200)]
    upload = client.files.create(file=("big.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 200
    output = results(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in output) == sorted(x["custom_id"] for x in lines)


def _serve(data_dir: Path, port_file: Path) -> subprocess.Popen:
    # A real `sorai serve` (its own process, so that it can be SIGKILLed), on a free port.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    port_file.write_text(str(port))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    command = [sys.executable, "-m", "sorai.cli", "serve", "--port", str(port)]
    return subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _client(port_file: Path, timeout: float = 300.0) -> openai.OpenAI:
    url = f"http://127.0.0.1:{port_file.read_text()}/v1"
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.models.list()
            return client
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, "sorai serve did not start"
            time.sleep(0.5)


@pytest.mark.slow
def test_a_batch_killed_mid_way_resumes_and_answers_every_line_once(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    lines = [chat_line(i, max_tokens=8) for i in range(40)]
    server = _serve(tmp_path / "data", port_file)
    try:
        client = _client(port_file)
        upload = client.files.create(file=("b.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while client.batches.retrieve(batch.id).request_counts.completed < 5:
            time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    killed_at = json.loads(
        (tmp_path / "data" / "batches" / f"{batch.id}.jsonl").read_text().split("\n")[1]
    )
    assert killed_at["kind"] == "output"
    server = _serve(tmp_path / "data", port_file)
    try:
        client = _client(port_file)
        done = wait(client, batch.id)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    assert done.status == "completed" and done.request_counts.completed == 40
    output = results_of(tmp_path / "data", done.output_file_id)
    ids = [r["custom_id"] for r in output]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)  # each exactly once
    entries = (tmp_path / "data" / "batches" / f"{batch.id}.jsonl").read_text().splitlines()
    assert len([e for e in entries if e.strip()]) == 40  # no line ran to the end twice


def results_of(data_dir: Path, file_id: str) -> list[dict]:
    text = (data_dir / "files" / file_id).read_text()
    return [json.loads(x) for x in text.splitlines()]
