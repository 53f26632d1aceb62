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
def saved(default_gguf: Path, tmp_path_factory) -> tuple[sorai.LLM, Path]:
    # Dense (the GGUF dequantized), as a Hugging Face directory reloads; a low-bit model saves
    # the same float weights (test_saving_a_low_bit_model_writes_its_float_weights).
    llm = sorai.load(default_gguf, quantize="none")
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


def test_saving_a_low_bit_model_writes_its_float_weights(
    default_llm: sorai.LLM, saved, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    _, dense_path = saved
    default_llm.save(tmp_path)  # int4 blocks from the GGUF's Q4_1
    ours = load_file(tmp_path / "model.safetensors")
    dense = load_file(dense_path / "model.safetensors")
    assert ours.keys() == dense.keys()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        torch.testing.assert_close(ours[name], dense[name], rtol=0, atol=1e-6)
