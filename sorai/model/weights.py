"""Weights I/O: Hugging Face safetensors directories (incl. sharded) in and out, GGUF in."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sorai.errors import ModelFormatError
from sorai.model.config import ModelConfig
from sorai.model.gguf import GGUFFile
from sorai.model.transformer import Transformer, rope_inv_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_BYTES = 4 << 30


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelFormatError(
            f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}"
        ) from None


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def _our_name(hf_name: str) -> str | None:
    if hf_name.startswith("lm_head."):
        return hf_name
    if hf_name.startswith("model.") and not hf_name.endswith("rotary_emb.inv_freq"):
        return hf_name.removeprefix("model.")
    return None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelFormatError(f"{index}: not a safetensors index ({e})") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise ModelFormatError(f"{path} has no *.safetensors weights (found: {found})")
    return files


def read_hf_tensors(path: Path) -> Iterable[tuple[str, Tensor]]:
    for file in safetensors_files(path):
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"{file}: unreadable safetensors file ({e})") from None
        for hf_name, tensor in tensors.items():
            if (name := _our_name(hf_name)) is not None:
                yield name, tensor


def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, Tensor]],
    dtype: torch.dtype,
    source: Path,
    model: Transformer | None = None,
) -> Transformer:
    """A Transformer whose parameters are exactly `tensors` (cast to dtype); names are checked.

    `model`: one built on the meta device whose low-bit layers are already in place; the
    tensors fill the rest.
    """
    if model is None:
        with torch.device("meta"):
            model = Transformer(config)
    expected = {name: p.shape for name, p in model.named_parameters() if p.is_meta}
    state = {}
    for name, tensor in tensors:
        if name not in expected:
            raise ModelFormatError(f"{source}: unexpected weight {name!r}")
        if tensor.shape != expected[name]:
            raise ModelFormatError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, "
                f"config says {tuple(expected[name])}"
            )
        state[name] = tensor.to(dtype)
    tied = config.tie_word_embeddings and "lm_head.weight" not in state
    missing = [n for n in expected if n not in state and not (tied and n == "lm_head.weight")]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFormatError(f"{source}: missing weights {', '.join(missing[:3])}{more}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def load_hf_dir(path: Path, dtype: torch.dtype) -> Transformer:
    config = ModelConfig.from_file(path / "config.json")
    return build_model(config, read_hf_tensors(path), dtype, path)


def load_gguf(gguf: GGUFFile, dtype: torch.dtype) -> Transformer:
    config = gguf.config()
    model = build_model(config, gguf.tensors(config), dtype, gguf.path)
    if (factors := gguf.rope_freq_factors()) is not None:
        model.inv_freq = model.inv_freq / factors
    return model


def dense_state(model: Transformer) -> dict[str, Tensor]:
    """The state dict with every low-bit layer's weight dequantized to the model's dtype
    (exactly the float values it stands for), so any Hugging Face reader takes it."""
    state: dict[str, Tensor] = {}
    lowbit = {n: m for n, m in model.named_modules() if hasattr(m, "dequantize")}
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module not in lowbit or name.endswith(".bias"):
            state[name] = tensor
    for module, layer in lowbit.items():
        state[f"{module}.weight"] = layer.dequantize(model.dtype)
    return state


def save_hf_dir(model: Transformer, path: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json and model*.safetensors (sharded with an index above shard_bytes)."""
    if not torch.equal(model.inv_freq.cpu(), rope_inv_freq(model.config)):
        # e.g. a Llama 3.1 GGUF's rope_freqs: config.json has no way to say it exactly.
        raise ModelFormatError(
            "this model's rotary frequencies come from its GGUF file (rope_freqs) and cannot "
            "be written to config.json; saving it would change the model"
        )
    if any(name.endswith(".lora_A.weight") for name, _ in model.named_parameters()):
        raise ModelFormatError(
            "this model has LoRA layers; merge_lora(model) before saving it as a Hugging Face "
            "directory, or save the adapter alone with save_adapter"
        )
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {
        _hf_name(name): p.detach().contiguous()
        for name, p in dense_state(model).items()
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    index["weight_map"] = weight_map
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
