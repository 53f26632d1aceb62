"""A model of any shape with random weights and a real tokenizer: tests and benchmarks train
and shard these where the default model's shape would be too small or too slow."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sorai.model.gguf import GGUFFile
from sorai.model.loader import read_config
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import save_hf_dir


def write_random_model(gguf: Path, path: Path, seed: int = 0, **config: object) -> Path:
    """An HF directory at `path`: the tokenizer and vocabulary of the model in `gguf`, its
    config with `config`'s fields replaced, and random weights drawn with `seed`."""
    torch.manual_seed(seed)
    model = Transformer(dataclasses.replace(read_config(gguf), **config))
    model.init_weights()
    save_hf_dir(model, path)
    Tokenizer.from_gguf_metadata(GGUFFile(gguf).metadata).save(path)
    return path
