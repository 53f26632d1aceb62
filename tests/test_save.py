"""A model saved as a Hugging Face directory is complete for both sorai and transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sorai

MESSAGES = [
    {"role": "system", "content": "You are concise."},
    {"role": "user", "content": "東京について一文で教えてください。"},
]


@pytest.fixture(scope="module")
def saved(default_llm: sorai.LLM, tmp_path_factory) -> tuple[sorai.LLM, Path]:
    llm = default_llm  # saving reads the weights and changes nothing
    path = tmp_path_factory.mktemp("saved")
    llm.save(path)
    return llm, path


def test_saved_directory_holds_weights_config_and_tokenizer(saved) -> None:
    _, path = saved
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names


def test_saved_directory_reloads_with_the_same_answers(saved) -> None:
    llm, path = saved
    again = sorai.load(path)
    assert again.tokenizer.encode_chat(MESSAGES) == llm.tokenizer.encode_chat(MESSAGES)
    assert again.tokenizer.eos_token_ids == llm.tokenizer.eos_token_ids
    first = llm.chat(MESSAGES, max_tokens=16, temperature=0)
    second = again.chat(MESSAGES, max_tokens=16, temperature=0)
    assert second.token_ids == first.token_ids


def test_transformers_reads_the_saved_tokenizer_and_template(saved) -> None:
    from transformers import AutoTokenizer

    llm, path = saved
    reference = AutoTokenizer.from_pretrained(path)
    ids = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == llm.tokenizer.encode_chat(MESSAGES)


def test_transformers_generates_the_same_greedy_tokens_from_the_saved_directory(saved) -> None:
    from transformers import AutoModelForCausalLM

    llm, path = saved
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode_chat(MESSAGES)
    with torch.inference_mode():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    expected = out[0, len(ids) :].tolist()
    ours = llm.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    assert ours == expected[: len(ours)] and len(ours) == 16
