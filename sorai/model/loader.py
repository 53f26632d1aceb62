"""Open a model path (HF directory or .gguf file) into a Transformer and its Tokenizer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sorai.errors import DeviceError, ModelFormatError
from sorai.model.config import ModelConfig, check_chat_model
from sorai.model.gguf import GGUFFile, is_gguf
from sorai.model.hardware import auto_dtype
from sorai.model.memory import release_free_memory
from sorai.model.quant.load import check_quantize, load_gguf_lowbit, quantize_dense
from sorai.model.quant.lowbit_dir import dequantized, is_lowbit_dir, load_lowbit_dir
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
    quantize: str = "auto",
) -> tuple[Transformer, Tokenizer]:
    """The model (eval mode, on `device`) and its tokenizer; defaults as in `sorai.load`.

    quantize: auto (a GGUF keeps its low-bit weights, a dense checkpoint stays dense), none
    (every weight dequantized to `dtype`), int8 or int4 (see sorai.model.quant.load).
    Low-bit layers run on the CPU; on a GPU, auto loads dense weights.
    """
    device = resolve_device(device)
    if dtype is None or dtype == "auto":
        dtype = auto_dtype(device)[0]
    dtype = parse_dtype(dtype)
    quantize = check_quantize(quantize)
    if device.type != "cpu" and quantize in ("int8", "int4"):
        raise DeviceError(
            f"--quantize {quantize} runs on the CPU only; on {device} the weights load as "
            f"{str(dtype).removeprefix('torch.')} (use --quantize auto or none)"
        )
    lowbit = device.type == "cpu" and quantize != "none"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFormatError(
                f"{path} is not a Hugging Face model directory: it has no config.json"
            )
        if _is_llava_dir(path):  # a vision-language checkpoint: its decoder + image encoder
            from sorai.model.llava import load_llava_decoder

            model = load_llava_decoder(path, dtype)
        elif is_lowbit_dir(path):  # written by `sorai quantize --format safetensors`
            model = load_lowbit_dir(path, dtype)
            if not lowbit or quantize != "auto":
                model = dequantized(model, dtype, path)
        else:
            model = load_hf_dir(path, dtype)
        tokenizer = Tokenizer.from_dir(path)
        encoder = getattr(model, "image_encoder", None)
        if encoder is not None:
            tokenizer.image_text = tokenizer.id_to_token(encoder.image_token_index)
        if lowbit and quantize != "auto":
            quantize_dense(model, quantize)
    elif path.suffix == ".gguf" or is_gguf(path):
        gguf = GGUFFile(path)
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        model = load_gguf_lowbit(gguf, dtype, quantize) if lowbit else load_gguf(gguf, dtype)
    else:
        raise ModelFormatError(
            f"{path}: not a model; expected a Hugging Face directory or a .gguf file"
        )
    model = model.to(device)
    encoder = getattr(model, "image_encoder", None)
    if encoder is not None:
        encoder.to(device)
    if device.type == "cpu" and dtype == torch.float32:
        use_column_major_weights(model)
    release_free_memory()
    return model, tokenizer


def read_config(path: Path) -> ModelConfig:
    """A model path's architecture without loading its weights."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFormatError(
                f"{path} is not a Hugging Face model directory: it has no config.json"
            )
        if _is_llava_dir(path):
            raw = json.loads((path / "config.json").read_text())
            return ModelConfig.from_hf_dict(raw["text_config"])
        return ModelConfig.from_file(path / "config.json")
    if path.suffix == ".gguf" or is_gguf(path):
        return GGUFFile(path).config()
    raise ModelFormatError(
        f"{path}: not a model; expected a Hugging Face directory or a .gguf file"
    )


def _is_llava_dir(path: Path) -> bool:
    """Whether a model directory is a LLaVA checkpoint (sorai/model/llava.py, imported only
    then: it brings Pillow and the vision tower's code)."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "llava"
    except (OSError, ValueError, AttributeError):
        return False


def use_column_major_weights(model: Transformer) -> None:
    """Store each float32 Linear weight transposed in memory (same shape, same values).

    F.linear then runs x @ W.T on a contiguous [in, out] matrix, which MKL streams at
    ~17-18 GB/s for one-token decoding on a 2-core x86 CPU, against ~11 GB/s for the usual
    [out, in] layout: 58 -> 46 ms per decoded token for the default model, with identical
    logits. bfloat16 is the other way round (its transposed kernel is 10x slower), so it keeps
    the usual layout.
    """
    relaid: dict[int, nn.Parameter] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight.dtype == torch.float32:
            column_major = weight.detach().t().contiguous().t()
            relaid[id(weight)] = nn.Parameter(column_major, requires_grad=weight.requires_grad)
    # Every module holding a relaid weight gets the new one, so a tied embedding still shares
    # the head's (largest) matrix instead of handing it back its old layout.
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in relaid:
            module.weight = relaid[id(weight)]


def load_pretrained(
    model: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    adapter: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    quantize: str = "auto",
) -> tuple[Transformer, Tokenizer, str]:
    """A known model name (pulled on first use), an HF directory or a .gguf file, with an
    optional PEFT LoRA adapter merged in; returns the model, its tokenizer and its name.

    The name is `model` as given, plus `+<adapter name>` with an adapter (see adapter_name).
    A bad adapter raises LoRAError naming the path, before the (slow) model load. An adapter
    merges into dense weights: with one, `auto` loads dense, and int8/int4 quantize after the
    merge.
    """
    from sorai import hub
    from sorai.model.lora import adapter_name, check_adapter_dir, load_adapter, merge_lora

    check_chat_model(model)  # an unknown name or an embedding model, before any pull
    adapter_path = check_adapter_dir(hub.resolve_adapter(adapter)) if adapter is not None else None
    check_quantize(quantize)
    load_as = "none" if adapter_path is not None else quantize
    path = hub.resolve(model, progress=progress)
    transformer, tokenizer = load_model(path, dtype, device, quantize=load_as)
    name = os.fspath(model)
    if adapter_path is not None:
        # A and B stay float32 whatever the model's dtype: merge computes W + s·B·A in float32
        # and rounds once into the base weight, in place (its memory layout is kept).
        load_adapter(transformer, adapter_path, dtype=torch.float32)
        merge_lora(transformer)
        name = f"{name}+{adapter_name(adapter_path)}"
        if quantize in ("int8", "int4") and transformer.device.type == "cpu":
            quantize_dense(transformer, quantize)
    return transformer, tokenizer, name
