"""Build a Transformer with low-bit layers: from a GGUF's own blocks, or quantizing at load.

Which format each matmul gets (`quantize`):
  auto  a GGUF keeps its quantization: Q4_0/Q4_1/Q4_K load as int4 as they are, Q8_0 as int8
        (rows rescaled); other quantized types are requantized to int8 (5 bits and more) or
        int4 (fewer); float tensors and dense checkpoints stay dense.
  int8  every block projection in int8.
  int4  every block projection in int4 (group 32).
The token table (embedding, and the head tied to it or not) goes to int8 per row whenever it
is quantized in the file or the scheme is int8/int4 (see sorai.model.quant.table): the head is
the largest matmul, and 4 bits would cost its logits too much. A matrix whose shape a kernel
does not take stays dense (int4 falls back to int8 first). Norms and biases stay in the model's
dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from sorai.errors import ModelFormatError
from sorai.model.config import ModelConfig
from sorai.model.gguf import GGUFFile, TensorInfo, unpermute_qk
from sorai.model.memory import release_free_memory
from sorai.model.quant.gguf_blocks import INT4_TYPES, int4_groups, q8_0_rows
from sorai.model.quant.linear import (
    Int4Linear,
    Int8Linear,
    int4_fits,
    int8_fits,
    quantize_rows_int8,
)
from sorai.model.quant.table import Int8Embedding, Int8Head
from sorai.model.transformer import Transformer
from sorai.model.weights import build_model

FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# Quantized GGUF types by bits per weight, for choosing the nearest kernel.
LOW_BIT_TYPES = {"Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS"}
LOW_BIT_TYPES |= {"IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4"}


def _qtype_name(info: TensorInfo) -> str:
    import gguf

    return gguf.GGMLQuantizationType(info.qtype).name


def _target(qtype: str, scheme: str) -> str:
    """'int4', 'int8' or 'dense' for a block projection of GGUF type `qtype`."""
    if scheme == "auto":
        if qtype in FLOAT_TYPES:
            return "dense"
        return "int4" if qtype in LOW_BIT_TYPES else "int8"
    return scheme


def _table_target(qtype: str, scheme: str) -> str:
    """'int8' or 'dense' for the token table (embedding or head) of GGUF type `qtype`."""
    return "dense" if scheme == "auto" and qtype in FLOAT_TYPES else "int8"


def fitting(target: str, out_features: int, in_features: int) -> str:
    """The target, or the next format down whose kernel takes this shape."""
    if target == "int4" and not int4_fits(out_features, in_features):
        target = "int8"
    if target == "int8" and not int8_fits(in_features):
        target = "dense"
    return target


def _unpermute(t: Tensor, heads: int | None) -> Tensor:
    return t if heads is None else unpermute_qk(t, heads)


def _int8_rows(
    gguf: GGUFFile, name: str, info: TensorInfo, config: ModelConfig
) -> tuple[Tensor, Tensor]:
    """(q int8, scale per row) of one weight: Q8_0 blocks rescaled, other types requantized."""
    if _qtype_name(info) == "Q8_0":
        q, scale = q8_0_rows(gguf.raw(info), info.shape[0])
        heads = gguf.permuted_heads(name, config)
        return _unpermute(q, heads), _unpermute(scale, heads)
    return quantize_rows_int8(gguf.dequantized(name, info, config))


def _gguf_layer(
    gguf: GGUFFile, name: str, info: TensorInfo, config: ModelConfig, target: str
) -> nn.Module:
    qtype = _qtype_name(info)
    if target == "int4" and qtype in INT4_TYPES:
        q, scale, minimum = int4_groups(gguf.raw(info), qtype, info.shape[0])
        heads = gguf.permuted_heads(name, config)
        return Int4Linear(*(_unpermute(t, heads) for t in (q, scale, minimum)))
    if target == "int8":
        return Int8Linear(*_int8_rows(gguf, name, info, config))
    # this tensor only, dequantized and requantized
    return Int4Linear.quantize(gguf.dequantized(name, info, config))


def _module_name(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_block_matmul(model: Transformer, name: str) -> bool:
    module = _module_name(name)
    return (
        name.startswith("layers.")
        and name.endswith(".weight")
        and isinstance(model.get_submodule(module), nn.Linear)
    )


def place_layer(model: Transformer, module: str, layer: nn.Module) -> None:
    parent, _, child = module.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


TABLES = ("embed_tokens.weight", "lm_head.weight")
# Tensors loaded between two hand-backs of freed memory to the OS.
TRIM_EVERY = 16


def load_gguf_lowbit(gguf: GGUFFile, dtype: torch.dtype, scheme: str) -> Transformer:
    config = gguf.config()
    with torch.device("meta"):
        model = Transformer(config)
    dense: list[tuple[str, Tensor]] = []
    for count, (name, info) in enumerate(gguf.entries(), 1):
        if count % TRIM_EVERY == 0:
            # Each layer's temporaries (its bytes, int32 codes for the packing) are freed
            # between the layers kept, and glibc keeps the holes: trimmed only at the end, the
            # default model's load peaked ~200 MB above its resident size.
            release_free_memory()
        qtype = _qtype_name(info)
        if _is_block_matmul(model, name):
            target = fitting(_target(qtype, scheme), *info.shape)
        elif name in TABLES:
            target = fitting(_table_target(qtype, scheme), *info.shape)
        else:
            target = "dense"
        if target == "dense":
            dense.append((name, gguf.dequantized(name, info, config)))
        elif name == "embed_tokens.weight":
            model.embed_tokens = Int8Embedding(*_int8_rows(gguf, name, info, config), dtype)
        elif name == "lm_head.weight":
            model.lm_head = Int8Head(*_int8_rows(gguf, name, info, config))
        else:
            place_layer(model, _module_name(name), _gguf_layer(gguf, name, info, config, target))
    tie_table(model)
    model = build_model(config, split_biases(model, dense, dtype), dtype, gguf.path, model=model)
    if (factors := gguf.rope_freq_factors()) is not None:
        model.inv_freq = model.inv_freq / factors
    return model


def tie_table(model: Transformer) -> None:
    """A tied head reads the int8 embedding's own table (the float tie is a shared Parameter)."""
    if (
        model.config.tie_word_embeddings
        and isinstance(model.embed_tokens, Int8Embedding)
        and isinstance(model.lm_head, nn.Linear)
    ):
        model.lm_head = Int8Head.tied_to(model.embed_tokens)


def quantize_dense(model: Transformer, scheme: str) -> Transformer:
    """Replace a dense model's block projections (and token table) with low-bit layers."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            target = fitting(scheme, module.out_features, module.in_features)
            bias = None if module.bias is None else module.bias.detach()
            if target == "int4":
                layers[name] = Int4Linear.quantize(module.weight, bias=bias)
            elif target == "int8":
                layers[name] = Int8Linear.quantize(module.weight, bias=bias)
    for module_name, layer in layers.items():
        place_layer(model, module_name, layer)
    embed, head = model.embed_tokens, model.lm_head
    tied = isinstance(embed, nn.Embedding) and head is not None and head.weight is embed.weight
    if isinstance(embed, nn.Embedding) and int8_fits(embed.embedding_dim):
        model.embed_tokens = Int8Embedding.quantize(embed.weight)
        if tied:
            model.lm_head = Int8Head.tied_to(model.embed_tokens)
    if isinstance(model.lm_head, nn.Linear) and int8_fits(model.lm_head.in_features):
        bias = None if head.bias is None else head.bias.detach()
        model.lm_head = Int8Head(*quantize_rows_int8(head.weight), bias)
    return model


def split_biases(
    model: Transformer, dense: Iterable[tuple[str, Tensor]], dtype: torch.dtype
) -> Iterable[tuple[str, Tensor]]:
    """Biases of low-bit layers go onto those layers; everything else is for build_model."""
    for name, tensor in dense:
        module = _module_name(name)
        owner = model.get_submodule(module) if module else model
        if name.endswith(".bias") and not isinstance(owner, nn.Linear):
            owner.bias = nn.Parameter(tensor.to(dtype), requires_grad=False)
            continue
        yield name, tensor


def check_quantize(value: str) -> str:
    from sorai.model.quant import QUANTIZE_CHOICES

    if value not in QUANTIZE_CHOICES:
        raise ModelFormatError(
            f"quantize {value!r} is not supported; choose one of {', '.join(QUANTIZE_CHOICES)}"
        )
    return value
