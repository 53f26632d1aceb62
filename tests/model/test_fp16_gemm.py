"""fbgemm's float16 GEMM as the low-bit layers' path: a row's result is the same alone, in any
batch and on any thread count, and the layers compute their own weights' products."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sorai.model.quant import Int4Linear, Int8Linear, decode_path, fp16_gemm
from sorai.model.quant.table import Int8Head

pytestmark = pytest.mark.skipif(
    not fp16_gemm.supported(), reason="this torch build has no batch-invariant fbgemm fp16 GEMM"
)


def test_a_rows_result_depends_on_neither_its_batch_nor_the_threads() -> None:
    torch.manual_seed(0)
    weight = torch.randn(1536, 576) / 24
    packed = fp16_gemm.pack(weight)
    x = torch.randn(600, 576)  # more rows than one call takes: sliced
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        together = fp16_gemm.linear(x, packed, 1536)
        torch.set_num_threads(2)
        assert torch.equal(fp16_gemm.linear(x, packed, 1536), together)
        # Every count a step can have, at several offsets: 1 and 2 rows and fbgemm's odd tails
        # (7, 14, 31, 32 on AVX2) are padded to counts that sum as the others do.
        for n in [*range(1, 41), 121, 127, 300]:
            for start in (0, 5):
                alone = fp16_gemm.linear(x[start : start + n], packed, 1536)
                assert torch.equal(alone, together[start : start + n]), n
    finally:
        torch.set_num_threads(threads)
    # The float16 weight's products, summed in float32.
    reference = x @ weight.to(torch.float16).float().T
    torch.testing.assert_close(together, reference, rtol=1e-4, atol=1e-4)
    assert fp16_gemm.linear(x[:0], packed, 1536).shape == (0, 1536)


def test_low_bit_layers_on_the_path_compute_their_dequantized_weights() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        Int4Linear.quantize(torch.randn(256, 64) / 8, bias=torch.randn(256)),
        Int8Linear.quantize(torch.randn(64, 256) / 16),
    )
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        expected = model[1].dequantize() @ (
            (x @ model[0].dequantize().T + model[0].bias).transpose(1, 2)
        )
        decode_path.use(model, "fp16")
        assert model[0].fp16_weight is None  # packed on first use only
        out = model(x)
        assert model[0].fp16_weight is not None
        assert "float16 GEMM copy" in model[0].weight_format
        torch.testing.assert_close(out, expected.transpose(1, 2), rtol=2e-3, atol=2e-3)
        # Prompt rows and generated rows take the same path: a row's numbers are its own.
        assert torch.equal(model(x[:, 2:3]), out[:, 2:3])
        decode_path.use(model, "kernel")
        assert model[0].fp16_weight is None and not model[0].fp16_decode


def test_the_head_recomputes_its_top_logits_from_the_int8_rows() -> None:
    torch.manual_seed(2)
    head = Int8Head.quantize(torch.randn(4096, 64))
    x = torch.randn(4, 64)
    with torch.inference_mode():
        kernel = head(x)
        decode_path.use(head, "fp16")
        fp16 = head(x)
    exact = x @ head.dequantize().T
    top = exact.topk(8).indices
    # The top logits are the int8 rows' own in float32, whichever path ran the table.
    torch.testing.assert_close(fp16.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(fp16.argmax(-1), kernel.argmax(-1))
    torch.testing.assert_close(fp16, exact, rtol=5e-3, atol=5e-3)
