"""sorai's own low-bit safetensors layout: a Hugging Face directory whose low-bit layers are
stored as their integer codes and scales, loaded straight back into the same layers.

config.json carries `quantization_config: {"quant_method": "sorai", ...}` with a note on the
layout. Per low-bit module (Hugging Face names, e.g. model.layers.0.mlp.up_proj):
  int4   .nibbles uint8 [out, in/2] (even input in the low half), .scale and .minimum float32
         [out, in/32]: w = q * scale + minimum per group of 32 (GGUF Q4_1's layout)
  int8   .q int8 [out, in], .scale float32 [out]: w = q * scale (also the token table,
         model.embed_tokens, and an untied lm_head)
Everything else (norms, biases, dense layers) is stored as in any Hugging Face checkpoint. The
kernels' packed forms depend on the CPU, so they are rebuilt at load from the codes (no float
weights are made on the way).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from sorai.errors import ModelFormatError
from sorai.model.config import ModelConfig
from sorai.model.quant.linear import Int4Linear, Int8Linear
from sorai.model.quant.load import place_layer, split_biases, tie_table
from sorai.model.quant.table import Int8Embedding, Int8Head
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import build_model, dense_state, read_hf_tensors

QUANT_METHOD = "sorai"
FORMAT_VERSION = 1
NOTE = (
    "sorai low-bit layout: int4 layers as .nibbles (uint8, two 4-bit codes per byte, even "
    "input index low) with .scale and .minimum per group of 32 inputs (w = q * scale + "
    "minimum); int8 layers and the token table as .q (int8) with one .scale per row (w = q * "
    "scale). Load with sorai (sorai serve DIR); other readers need the dense weights."
)
_STORED = {Int4Linear: ("nibbles", "scale", "minimum"), Int8Linear: ("q", "scale")}
_STORED[Int8Embedding] = _STORED[Int8Head] = ("q", "scale")
_CODES = {"nibbles", "minimum", "q", "scale"}


def is_lowbit_dir(path: Path) -> bool:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def save_lowbit_dir(model: Transformer, tokenizer: Tokenizer, path: Path) -> None:
    """config.json (with the layout note), model.safetensors and the tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "group_size": 32,
        "note": NOTE,
    }
    state: dict[str, Tensor] = {}
    lowbit = {name: m for name, m in model.named_modules() if type(m) in _STORED}
    tied = model.config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if name == "lm_head.weight" and tied or module == "lm_head" and tied:
            continue
        layer = lowbit.get(module)
        if layer is not None and leaf not in _STORED[type(layer)] and leaf != "bias":
            continue  # the kernels' own forms, rebuilt at load
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        state[hf_name] = tensor.detach().contiguous()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(path)


def load_lowbit_dir(path: Path, dtype: torch.dtype) -> Transformer:
    """The model a save_lowbit_dir directory holds, its low-bit layers as they were saved."""
    config = ModelConfig.from_file(path / "config.json")
    # The layout note describes this directory, not the model: a dense save of it has none.
    config.extra.pop("quantization_config", None)
    with torch.device("meta"):
        model = Transformer(config)
    codes: dict[str, dict[str, Tensor]] = defaultdict(dict)
    dense: list[tuple[str, Tensor]] = []
    for name, tensor in read_hf_tensors(path):
        module, _, leaf = name.rpartition(".")
        if leaf in _CODES:
            codes[module][leaf] = tensor
        else:
            dense.append((name, tensor))
    for module, parts in codes.items():
        place_layer(model, module, _layer(path, module, parts, dtype))
    tie_table(model)
    return build_model(config, split_biases(model, dense, dtype), dtype, path, model=model)


def _layer(path: Path, module: str, parts: dict[str, Tensor], dtype: torch.dtype):
    if set(parts) == {"nibbles", "scale", "minimum"}:
        nibbles = parts["nibbles"]
        q = torch.stack((nibbles & 15, nibbles >> 4), dim=-1).view(nibbles.shape[0], -1)
        return Int4Linear(q, parts["scale"], parts["minimum"])
    if set(parts) == {"q", "scale"}:
        if module == "embed_tokens":
            return Int8Embedding(parts["q"], parts["scale"], dtype)
        kind = Int8Head if module == "lm_head" else Int8Linear
        return kind(parts["q"], parts["scale"])
    raise ModelFormatError(
        f"{path}: low-bit layer {module} has tensors {', '.join(sorted(parts))}; expected "
        "nibbles, scale and minimum (int4) or q and scale (int8)"
    )


def dequantized(model: Transformer, dtype: torch.dtype, source: Path) -> Transformer:
    """The same model with every low-bit layer replaced by its exact float weights."""
    state = dense_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the tie is rebuilt from the embedding
    return build_model(model.config, state.items(), dtype, source)
