"""Model shapes the estimator's tests share: tiny configs to measure against, and Llama 3 8B's
numbers worked out by hand."""

from __future__ import annotations

import torch

from sorai.model.config import ModelConfig
from sorai.model.transformer import Transformer

TINY = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# Tied embeddings, q/k/v biases (qwen2), MLP biases, an explicit head_dim.
TINY_QWEN = ModelConfig(
    model_type="qwen2",
    vocab_size=300,
    hidden_size=96,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=24,
    tie_word_embeddings=True,
    mlp_bias=True,
)
TINY_BIAS = ModelConfig(
    vocab_size=200,
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    attention_bias=True,
    mlp_bias=True,
)
B, T = 2, 64


def meta_model(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


def numel(model: Transformer) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is listed once


# Llama 3 8B by hand: Ψ, one block (4 x 4096 q/o, 1024-wide k/v, 14336-wide MLP, two norms),
# and FSDP's root unit (embedding, head, final norm).
PSI_8B = 8_030_261_248
BLOCK_8B = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
ROOT_8B = 2 * 128256 * 4096 + 4096
