"""Random LoRA adapters written in PEFT's on-disk format, for the multi-adapter tests.

Written by hand (adapter_config.json + adapter_model.safetensors under PEFT's key names), not
with sorai's save_adapter, so the tests read what any PEFT user would hand the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from sorai.model.lora import linear_shapes
from sorai.model.transformer import Transformer


@dataclass(frozen=True)
class Spec:
    r: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool = False


# Eight adapters: ranks 1 to 16, attention-only, MLP-only, everything, a single module.
EIGHT = (
    Spec(4, 8, ("q_proj", "v_proj")),
    Spec(16, 16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    Spec(8, 32, ("gate_proj", "up_proj", "down_proj")),
    Spec(2, 4, ("down_proj",)),
    Spec(12, 24, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    Spec(1, 2, ("o_proj", "up_proj")),
    Spec(8, 8, ("k_proj", "gate_proj"), use_rslora=True),
    Spec(6, 12, ("v_proj", "down_proj")),
)


def write_adapter(path: Path, model: Transformer, spec: Spec, seed: int, std: float = 0.1) -> Path:
    """A random adapter for `model` at `path`; B drawn with `std` so it changes the output."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (in_features, out_features) in linear_shapes(model).items():
        if name.rsplit(".", 1)[-1] not in spec.targets:
            continue
        key = f"base_model.model.model.{name}"
        a = torch.randn(spec.r, in_features, generator=generator) / in_features**0.5
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, spec.r, generator=generator)
        tensors[f"{key}.lora_B.weight"] *= std
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(spec.targets),
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "base_model_name_or_path": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
