"""Named architectures: the ModelConfig of well-known models by name, for work that needs a
model's shape and not its weights (`sorai train --estimate --model llama-3-70b`)."""

from __future__ import annotations

import dataclasses

from sorai.model.config import ModelConfig

KNOWN_CONFIGS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "llama-3-70b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}


def known_config(name: str) -> ModelConfig:
    """A fresh copy of a KNOWN_CONFIGS entry (ModelConfig is mutable)."""
    try:
        config = KNOWN_CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_CONFIGS))
        raise ValueError(f"unknown architecture {name!r}; known: {known}") from None
    return ModelConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
