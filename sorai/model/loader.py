"""Open a model path (HF directory or .gguf file) into a Transformer and its Tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from sorai.errors import ModelFormatError
from sorai.model.gguf import GGUFFile, is_gguf
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import load_gguf, load_hf_dir, parse_dtype


def load_model(path: Path, dtype: str | torch.dtype = "float32") -> tuple[Transformer, Tokenizer]:
    dtype = parse_dtype(dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFormatError(
                f"{path} is not a Hugging Face model directory: it has no config.json"
            )
        return load_hf_dir(path, dtype), Tokenizer.from_dir(path)
    if path.suffix == ".gguf" or is_gguf(path):
        gguf = GGUFFile(path)
        return load_gguf(gguf, dtype), Tokenizer.from_gguf_metadata(gguf.metadata)
    raise ModelFormatError(
        f"{path}: not a model; expected a Hugging Face directory or a .gguf file"
    )
