"""Reading a GGUF file: metadata, a ModelConfig, and dequantized tensors under our names.

Dequantization is the `gguf` package's (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and the
rest it knows). llama.cpp permutes the rows of Q and K for its interleaved rotary embedding;
loading reverses that so the weights suit the Hugging Face (rotate-half) layout we use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sorai.errors import ModelFormatError
from sorai.model.config import SUPPORTED_ARCHITECTURES, ModelConfig

GGUF_MAGIC = b"GGUF"

# Architectures whose Q/K rows llama.cpp's converter permutes (the others use NeoX rotary,
# which is already our layout).
PERMUTED_QK = {"llama", "mistral"}

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class GGUFFile:
    """An opened GGUF file: plain-Python metadata and lazily dequantized tensors."""

    def __init__(self, path: Path) -> None:
        import gguf  # imported here: it is only needed for .gguf models

        self.path = path
        if not is_gguf(path):
            raise ModelFormatError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        try:
            self._reader = gguf.GGUFReader(path)
            self.metadata: dict[str, Any] = {
                key: field.contents() for key, field in self._reader.fields.items()
            }
        except Exception as e:  # the reader raises assorted errors on truncated files
            raise ModelFormatError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from e
        self.architecture = self.metadata.get("general.architecture", "")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelFormatError(
                f"{path}: architecture {self.architecture!r} is not supported; "
                f"supported: {supported}"
            )

    def _get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def config(self) -> ModelConfig:
        names = {t.name for t in self._reader.tensors}
        try:
            n_heads = int(self._get("attention.head_count"))
            hidden = int(self._get("embedding_length"))
            vocab = self._get("vocab_size") or len(self.metadata["tokenizer.ggml.tokens"])
            raw = {
                "model_type": self.architecture,
                "vocab_size": int(vocab),
                "hidden_size": hidden,
                "intermediate_size": int(self._get("feed_forward_length")),
                "num_hidden_layers": int(self._get("block_count")),
                "num_attention_heads": n_heads,
                "num_key_value_heads": int(self._get("attention.head_count_kv", n_heads)),
                "head_dim": int(self._get("attention.key_length", hidden // n_heads)),
                "max_position_embeddings": int(self._get("context_length", 2048)),
                "rms_norm_eps": float(self._get("attention.layer_norm_rms_epsilon", 1e-6)),
                "rope_theta": float(self._get("rope.freq_base", 10000.0)),
                "tie_word_embeddings": "output.weight" not in names,
                "attention_bias": "blk.0.attn_output.bias" in names,
                "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            }
        except (KeyError, TypeError) as e:
            raise ModelFormatError(f"{self.path}: GGUF metadata lacks {e}") from None
        scaling = self._get("rope.scaling.type", "none")
        if scaling == "linear":
            factor = self._get("rope.scaling.factor")
            if not isinstance(factor, (int, float)) or factor <= 0:
                raise ModelFormatError(f"{self.path}: linear rope scaling without a factor")
            raw["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        elif scaling != "none":
            raise ModelFormatError(
                f"{self.path}: rope scaling type {scaling!r} is not supported; "
                "supported: none, linear (and llama3 via rope_freqs)"
            )
        return ModelConfig.from_hf_dict(raw)

    def rope_freq_factors(self) -> Tensor | None:
        """Llama 3.1-style GGUFs store rope scaling as per-frequency divisors, not metadata."""
        for tensor in self._reader.tensors:
            if tensor.name == "rope_freqs.weight":
                return torch.from_numpy(np.array(tensor.data, dtype=np.float32))
        return None

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
        """(our parameter name, float32 tensor) for every weight, Q/K permutation reversed."""
        import gguf

        for tensor in self._reader.tensors:
            name = _our_name(tensor.name)
            if name is None:
                continue
            try:
                array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as e:
                raise ModelFormatError(
                    f"{self.path}: tensor {tensor.name} has unsupported type "
                    f"{tensor.tensor_type.name}"
                ) from e
            shape = tuple(int(d) for d in reversed(tensor.shape))
            array = np.ascontiguousarray(array, dtype=np.float32)
            if not array.flags.writeable:  # F32 tensors come straight from the read-only mmap
                array = array.copy()
            value = torch.from_numpy(array).reshape(shape)
            if self.architecture in PERMUTED_QK:
                if name.endswith(("q_proj.weight", "q_proj.bias")):
                    value = unpermute_qk(value, config.num_attention_heads)
                elif name.endswith(("k_proj.weight", "k_proj.bias")):
                    value = unpermute_qk(value, config.num_key_value_heads)
            yield name, value


def _our_name(gguf_name: str) -> str | None:
    if match := _BLOCK_RE.match(gguf_name):
        layer, part, kind = match.groups()
        return f"layers.{layer}.{_BLOCK_NAMES[part]}.{kind}" if part in _BLOCK_NAMES else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES else None


def unpermute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's row permutation of a Q or K projection (weight or bias)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
