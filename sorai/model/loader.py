"""Open a model path (HF directory or .gguf file) into a Transformer and its Tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from sorai.errors import DeviceError, ModelFormatError
from sorai.model.gguf import GGUFFile, is_gguf
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import load_gguf, load_hf_dir, parse_dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, checked; None picks the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device {device!r} is not valid; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceError(
                f"device {str(device)!r} is not available (this machine has {count} CUDA "
                "device(s) usable by torch); use cpu"
            )
    elif device.type != "cpu":
        raise DeviceError(f"device {str(device)!r} is not supported; use cpu or cuda")
    return device


def load_model(
    path: Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Transformer, Tokenizer]:
    """The model (eval mode, on `device`) and its tokenizer; defaults as in `sorai.load`."""
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = parse_dtype(dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFormatError(
                f"{path} is not a Hugging Face model directory: it has no config.json"
            )
        model, tokenizer = load_hf_dir(path, dtype), Tokenizer.from_dir(path)
    elif path.suffix == ".gguf" or is_gguf(path):
        gguf = GGUFFile(path)
        model, tokenizer = load_gguf(gguf, dtype), Tokenizer.from_gguf_metadata(gguf.metadata)
    else:
        raise ModelFormatError(
            f"{path}: not a model; expected a Hugging Face directory or a .gguf file"
        )
    return model.to(device), tokenizer
