"""A small random model with the default model's tokenizer: trains in a fraction of a second
per step, so loop, checkpoint and resume tests run real training without the real weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sorai.model.scratch import write_random_model

CHAT = [
    ("Book a table for two tonight", "restaurant_reservation"),
    ("I need a flight to Osaka on Monday", "flight_booking"),
    ("My phone screen is broken", "other"),
    ("来週の金曜日に3人でディナーの予約をしたいです", "restaurant_reservation"),
    ("6月10日に羽田から那覇へのフライトを予約したい", "flight_booking"),
    ("スマホの画面が割れてしまいました", "other"),
    ("What time do you open on Sundays?", "other"),
    ("Reserve two seats on the 9am flight to Paris", "flight_booking"),
]


def write_chat(path: Path, pairs=CHAT) -> Path:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ]
            },
            ensure_ascii=False,
        )
        for q, a in pairs
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(default_gguf: Path, tmp_path_factory) -> Path:
    """An HF directory: the default model's tokenizer and vocabulary, 2 small random layers."""
    return write_random_model(
        default_gguf,
        tmp_path_factory.mktemp("tiny-model"),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    return write_chat(tmp_path_factory.mktemp("data") / "chat.jsonl")
