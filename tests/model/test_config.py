"""ModelConfig from real-world config.json variants, clear errors for malformed ones, and the
named architectures."""

from __future__ import annotations

import pytest
import torch

from sorai.errors import ModelFormatError
from sorai.model.architectures import KNOWN_CONFIGS, known_config
from sorai.model.config import ModelConfig
from sorai.model.transformer import Transformer

BASE = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def test_null_head_dim_and_rope_fields_fall_back_to_defaults() -> None:
    config = ModelConfig.from_hf_dict(
        {**BASE, "head_dim": None, "rope_theta": None, "rope_scaling": None}
    )
    assert (config.head_dim, config.rope_theta, config.rope_scaling) == (16, 10000.0, None)


def test_mistral_sliding_window_caps_the_context_length() -> None:
    config = ModelConfig.from_hf_dict({**BASE, "model_type": "mistral", "sliding_window": 1024})
    assert config.context_length == 1024


def test_qwen2_sliding_window_counts_only_when_enabled() -> None:
    raw = {**BASE, "model_type": "qwen2", "sliding_window": 1024}
    assert ModelConfig.from_hf_dict({**raw, "use_sliding_window": False}).context_length == 4096
    assert ModelConfig.from_hf_dict({**raw, "use_sliding_window": True}).context_length == 1024


@pytest.mark.parametrize(
    ("key", "value"),
    [("num_attention_heads", 0), ("num_key_value_heads", 0), ("hidden_size", "64")],
)
def test_malformed_sizes_are_format_errors_naming_the_field(key: str, value) -> None:
    with pytest.raises(ModelFormatError, match=f"config {key} must be an integer >= 1"):
        ModelConfig.from_hf_dict({**BASE, key: value})


def test_unsupported_model_type_lists_the_supported_ones() -> None:
    with pytest.raises(ModelFormatError, match="supported: llama, mistral, qwen2"):
        ModelConfig.from_hf_dict({**BASE, "model_type": "gpt2"})


def test_heads_that_do_not_group_are_a_format_error() -> None:
    with pytest.raises(ModelFormatError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict({**BASE, "num_key_value_heads": 3})


@pytest.mark.parametrize(("name", "expected"), [("llama-3-8b", 8.03e9), ("llama-3-70b", 70.6e9)])
def test_named_architectures(name: str, expected: float) -> None:
    config = known_config(name)
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(expected, rel=0.005)
    config.hidden_size = 1  # a copy: the registry stays as it was
    assert KNOWN_CONFIGS[name].hidden_size in (4096, 8192)
    with pytest.raises(ValueError, match="known: llama-3-70b, llama-3-8b"):
        known_config("llama-4")
