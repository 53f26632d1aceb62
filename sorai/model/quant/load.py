"""Build a Transformer with low-bit layers: from a GGUF's own blocks, or quantizing at load.

Which format each matmul gets (`quantize`):
  auto  a GGUF keeps its quantization: Q4_0/Q4_1/Q4_K load as int4 as they are, Q8_0 as int8
        (rows rescaled); other quantized types are requantized to int8 (5 bits and more) or
        int4 (fewer); float tensors and dense checkpoints stay dense.
  int8  every block projection in int8.
  int4  every block projection in int4 (group 32).
The head (and the embedding table it is often tied to) stays in the model's dtype: its logits
pick every token, and the low-bit kernels round their output to bfloat16, where near-equal top
logits tie (measured on the default model: the first answer token of "What is the capital of
France?" tied at 25.25). Norms and biases stay in the model's dtype too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from sorai.errors import ModelFormatError
from sorai.model.config import ModelConfig
from sorai.model.gguf import GGUFFile, TensorInfo, unpermute_qk
from sorai.model.quant.gguf_blocks import INT4_TYPES, int4_groups, q8_0_rows
from sorai.model.quant.linear import Int4Linear, Int8Linear
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


def _unpermute(t: Tensor, heads: int | None) -> Tensor:
    return t if heads is None else unpermute_qk(t, heads)


def _gguf_layer(
    gguf: GGUFFile, name: str, info: TensorInfo, config: ModelConfig, target: str
) -> nn.Module:
    qtype = _qtype_name(info)
    heads = gguf.permuted_heads(name, config)
    rows = info.shape[0]
    if target == "int4" and qtype in INT4_TYPES and info.shape[1] % 32 == 0:
        q, scale, minimum = int4_groups(gguf.raw(info), qtype, rows)
        return Int4Linear(*(_unpermute(t, heads) for t in (q, scale, minimum)))
    if target == "int8" and qtype == "Q8_0":
        q, scale = q8_0_rows(gguf.raw(info), rows)
        return Int8Linear(_unpermute(q, heads), _unpermute(scale, heads))
    weight = gguf.dequantized(name, info, config)  # this tensor only: requantized below
    if target == "int4" and weight.shape[1] % 32 == 0:
        return Int4Linear.quantize(weight)
    return Int8Linear.quantize(weight)


def _module_name(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_block_matmul(model: Transformer, name: str) -> bool:
    module = _module_name(name)
    return (
        name.startswith("layers.")
        and name.endswith(".weight")
        and isinstance(model.get_submodule(module), nn.Linear)
    )


def _place(model: Transformer, module: str, layer: nn.Module) -> None:
    parent, _, child = module.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def load_gguf_lowbit(gguf: GGUFFile, dtype: torch.dtype, scheme: str) -> Transformer:
    config = gguf.config()
    with torch.device("meta"):
        model = Transformer(config)
    dense: list[tuple[str, Tensor]] = []
    for name, info in gguf.entries():
        target = _target(_qtype_name(info), scheme) if _is_block_matmul(model, name) else "dense"
        if target == "dense":
            dense.append((name, gguf.dequantized(name, info, config)))
        else:
            _place(model, _module_name(name), _gguf_layer(gguf, name, info, config, target))
    model = build_model(config, _cast_biases(model, dense, dtype), dtype, gguf.path, model=model)
    if (factors := gguf.rope_freq_factors()) is not None:
        model.inv_freq = model.inv_freq / factors
    return model


def quantize_dense(model: Transformer, scheme: str) -> Transformer:
    """Replace a dense model's block projections with low-bit layers, in place."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            bias = None if module.bias is None else module.bias.detach()
            if scheme == "int4" and module.in_features % 32 == 0:
                layers[name] = Int4Linear.quantize(module.weight, bias=bias)
            else:
                layers[name] = Int8Linear.quantize(module.weight, bias=bias)
    for module_name, layer in layers.items():
        _place(model, module_name, layer)
    return model


def _cast_biases(
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
