from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import sorai
from sorai.apps.client import Client


@pytest.fixture(scope="session")
def client(default_gguf) -> Iterator[Client]:
    """The embedded default model behind sorai's own server, in this process."""
    client = sorai.connect()
    yield client
    client.close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path
