"""Reading a GGUF file: metadata, a ModelConfig, and dequantized tensors under our names.

Dequantization is the `gguf` package's (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and the
rest it knows). llama.cpp permutes the rows of Q and K for its interleaved rotary embedding;
loading reverses that so the weights suit the Hugging Face (rotate-half) layout we use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import astuple, dataclass
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


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file, and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first)
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


# Bump when the index layout changes, so older cached indexes are ignored.
INDEX_VERSION = 1


def _index_path(path: Path) -> Path:
    from sorai.hub import sorai_home

    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20]
    return sorai_home() / "gguf-index" / f"{key}.json"


def _read_with_gguf(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    import gguf  # imported here: it is only needed for .gguf models

    try:
        reader = gguf.GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        tensors = [
            TensorInfo(
                t.name,
                tuple(int(d) for d in reversed(t.shape)),
                int(t.tensor_type),
                int(t.data_offset),
                int(t.n_bytes),
            )
            for t in reader.tensors
        ]
    except Exception as e:  # the reader raises assorted errors on truncated files
        raise ModelFormatError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from e
    return metadata, tensors


def read_index(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and tensor layout of a GGUF file, from the index cache when it is current.

    gguf's reader walks every vocabulary entry in Python (seconds for a 50k vocabulary); the
    plain-JSON index of the same facts loads in milliseconds, keyed by the file's size and
    modification time so a changed file is read afresh.
    """
    stat = path.stat()
    stamp = {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = _index_path(path)
    try:
        index = json.loads(cache.read_text())
        if {key: index.get(key) for key in stamp} == stamp:
            return index["metadata"], [TensorInfo(*t) for t in index["tensors"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    metadata, tensors = _read_with_gguf(path)
    record = {**stamp, "path": str(path), "metadata": metadata}
    record["tensors"] = [astuple(t) for t in tensors]
    with contextlib.suppress(OSError, TypeError, ValueError):  # a cache that cannot be written
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(record))
        os.replace(partial, cache)
    return metadata, tensors


class GGUFFile:
    """An opened GGUF file: plain-Python metadata and lazily dequantized tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not is_gguf(path):
            raise ModelFormatError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        self.metadata, self.tensor_infos = read_index(path)
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
        names = {t.name for t in self.tensor_infos}
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

    def raw(self, info: TensorInfo) -> np.ndarray:
        """A tensor's encoded bytes, read from the file into memory of their own.

        Read, not mapped: the pages of a mapped file that a load has read stay in the process's
        RSS while the mapping lives (the default model's whole 98 MB file at the load's peak),
        while a tensor's own copy goes as soon as its layer is built.
        """
        raw = np.empty(info.nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(raw))
        if got != info.nbytes:
            raise ModelFormatError(f"{self.path}: tensor {info.name} runs past the end of the file")
        return raw

    def as_float(self, info: TensorInfo) -> Tensor:
        """One tensor as float32 in the file's own layout, dequantized by the gguf package."""
        import gguf

        qtype = gguf.GGMLQuantizationType(info.qtype)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        # gguf takes rows of raw bytes: innermost dimension, in blocks, times block bytes.
        raw = self.raw(info).reshape(-1, info.shape[-1] // block_size * type_size)
        try:
            array = gguf.quants.dequantize(raw, qtype)
        except NotImplementedError as e:
            raise ModelFormatError(
                f"{self.path}: tensor {info.name} has unsupported type {qtype.name}"
            ) from e
        array = np.ascontiguousarray(array, dtype=np.float32)
        return torch.from_numpy(array).reshape(info.shape)

    def rope_freq_factors(self) -> Tensor | None:
        """Llama 3.1-style GGUFs store rope scaling as per-frequency divisors, not metadata."""
        for info in self.tensor_infos:
            if info.name == "rope_freqs.weight":
                return self.as_float(info)
        return None

    def entries(self) -> Iterator[tuple[str, TensorInfo]]:
        """(our parameter name, its tensor in the file) for every weight we load."""
        for info in self.tensor_infos:
            if (name := _our_name(info.name)) is not None:
                yield name, info

    def permuted_heads(self, name: str, config: ModelConfig) -> int | None:
        """The head count whose Q/K row permutation `name` carries in this file, else None."""
        if self.architecture in PERMUTED_QK:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                return config.num_attention_heads
            if name.endswith(("k_proj.weight", "k_proj.bias")):
                return config.num_key_value_heads
        return None

    def dequantized(self, name: str, info: TensorInfo, config: ModelConfig) -> Tensor:
        """One weight as float32 in our layout (Q/K permutation reversed)."""
        value = self.as_float(info)
        if (heads := self.permuted_heads(name, config)) is not None:
            value = unpermute_qk(value, heads)
        return value

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
        """(our parameter name, float32 tensor) for every weight, Q/K permutation reversed."""
        for name, info in self.entries():
            yield name, self.dequantized(name, info, config)


def _our_name(gguf_name: str) -> str | None:
    if match := _BLOCK_RE.match(gguf_name):
        layer, part, kind = match.groups()
        return f"layers.{layer}.{_BLOCK_NAMES[part]}.{kind}" if part in _BLOCK_NAMES else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES else None


def gguf_name(our_name: str) -> str | None:
    """The GGUF (llama.cpp) name of one of our parameter names, None for one it has no name for."""
    blocks = {ours: theirs for theirs, ours in _BLOCK_NAMES.items()}
    if match := re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", our_name):
        layer, part, kind = match.groups()
        return f"blk.{layer}.{blocks[part]}.{kind}" if part in blocks else None
    stem, _, kind = our_name.rpartition(".")
    top = {ours: theirs for theirs, ours in _TOP_NAMES.items()}
    return f"{top[stem]}.{kind}" if stem in top else None


def permute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's row permutation of a Q or K projection (the inverse of unpermute_qk)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's row permutation of a Q or K projection (weight or bias)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
