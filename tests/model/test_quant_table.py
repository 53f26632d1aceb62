"""The int8 token table (embedding and head) and the kernels' shape limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sorai.model.quant import Int4Linear, Int8Linear
from sorai.model.quant.load import fitting, quantize_dense
from sorai.model.quant.table import Int8Embedding, Int8Head
from sorai.model.weights import load_hf_dir

from .reference import write_hf_checkpoint


def _table(rows: int = 4096, dim: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows, dim) / 8


def test_the_embedding_gathers_the_rows_the_head_multiplies_by() -> None:
    embedding = Int8Embedding.quantize(_table())
    head = Int8Head.tied_to(embedding)
    assert head.q.data_ptr() == embedding.q.data_ptr()  # one table, not a copy
    ids = torch.tensor([[3, 4095, 0]])
    torch.testing.assert_close(embedding(ids)[0], embedding.dequantize()[ids[0]])
    assert embedding(ids).dtype == torch.float32
    assert (embedding.dequantize() - _table()).abs().max() <= embedding.scale.max() / 2 + 1e-7
    in_bf16 = Int8Embedding(embedding.q, embedding.scale, torch.bfloat16)
    assert in_bf16(ids).dtype == torch.bfloat16  # the model's dtype


def test_the_heads_top_logits_are_exact_float32_at_every_batch_size() -> None:
    head = Int8Head.tied_to(Int8Embedding.quantize(_table()))
    x = torch.randn(64, 64)
    exact = F.linear(x, head.dequantize())
    alone = torch.cat([head(row[None]) for row in x[:4]])  # the kernel, then float32 top-8
    together = head(x)[:4]  # 64 rows: the chunked dense GEMM, then float32 top-8
    for logits in (alone, together):
        top = exact[:4].topk(head.exact_top).indices
        torch.testing.assert_close(logits.gather(-1, top), exact[:4].gather(-1, top))
        assert torch.equal(logits.argmax(-1), exact[:4].argmax(-1))
        # The rest are the kernel's bfloat16-rounded logits.
        torch.testing.assert_close(logits, exact[:4], rtol=2e-2, atol=2e-2)
    assert torch.equal(alone.topk(8).indices, together.topk(8).indices)


def test_the_heads_logits_of_a_row_do_not_depend_on_the_rows_sampled_beside_it() -> None:
    # The engine hands the head [1, S, hidden]: S sampled rows must run the kernel as one row
    # does (up to dense_from_rows), not the dense GEMM, whose sums differ in the last bits.
    head = Int8Head.tied_to(Int8Embedding.quantize(_table()))
    x = torch.randn(16, 64)
    alone = torch.cat([head(row[None, None])[0] for row in x])
    assert torch.equal(head(x[None])[0], alone)


def test_a_bfloat16_head_returns_the_kernels_logits() -> None:
    head = Int8Head(*Int8Linear.quantize(_table()).state_dict().values())
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    logits = head(x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(
        logits.float(), F.linear(x.float(), head.dequantize()), atol=0.05, rtol=0.02
    )


def test_shapes_the_kernels_do_not_take_fall_back() -> None:
    assert fitting("int4", 192, 576) == "int4"
    assert fitting("int4", 24, 576) == "int8"  # the int4 packing takes rows in 16s
    assert fitting("int4", 192, 80) == "int8"  # not whole groups of 32
    assert fitting("int8", 192, 36) == "dense"  # the int8 kernel crashes on such widths
    with pytest.raises(ValueError, match="multiple of 8"):
        Int8Linear.quantize(torch.randn(16, 36))
    with pytest.raises(ValueError, match="does not fit the int4 kernel"):
        Int4Linear.quantize(torch.randn(24, 64))


@pytest.mark.parametrize("model_type, tied", [("llama", True), ("qwen2", False)])
def test_a_dense_checkpoint_quantized_at_load(tmp_path: Path, model_type: str, tied: bool) -> None:
    # 516 hidden units: gate/up rows are not in 16s (int4 -> int8), down's inputs not in 8s
    # (int8 -> dense).
    path = write_hf_checkpoint(
        tmp_path, model_type, tie_word_embeddings=tied, intermediate_size=516
    )
    dense = load_hf_dir(path, torch.float32)
    lowbit = quantize_dense(load_hf_dir(path, torch.float32), "int4")
    block = lowbit.layers["1"]
    assert isinstance(block.self_attn.q_proj, Int4Linear)
    assert isinstance(block.self_attn.k_proj, Int4Linear)
    assert isinstance(block.mlp.gate_proj, Int8Linear)
    assert isinstance(block.mlp.down_proj, nn.Linear)
    assert isinstance(lowbit.embed_tokens, Int8Embedding)
    assert isinstance(lowbit.lm_head, Int8Head)
    assert (lowbit.lm_head.q is lowbit.embed_tokens.q) == tied
    if model_type == "qwen2":  # its q/k/v biases ride on the low-bit layers
        torch.testing.assert_close(
            block.self_attn.q_proj.bias, dense.layers["1"].self_attn.q_proj.bias
        )
    # The dense model with the values the low-bit layers stand for: only the activations'
    # bfloat16 rounding separates the two.
    with torch.no_grad():
        for name, module in lowbit.named_modules():
            if hasattr(module, "dequantize"):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    ids = torch.tensor([[1, 5, 9, 200, 511]])
    with torch.inference_mode():
        ours, reference = lowbit(ids), dense(ids)
    assert (ours - reference).abs().max() < 0.02 * reference.abs().max()
