"""The decode step's leaner ops give the numbers of the forms they replace, bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sorai.model.transformer import RMSNorm


def test_a_float32_rms_norm_in_one_op_equals_normalise_then_scale() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data.normal_()
    for rows in (1, 16, 150):
        x = torch.randn(1, rows, 576)
        expected = norm.weight * F.rms_norm(x, (576,), eps=1e-5)
        assert torch.equal(norm(x), expected)


def test_decode_attention_without_a_mask_equals_an_all_true_mask() -> None:
    # The runner drops the decode mask when no sequence is padded (one sequence, or equal
    # lengths); SDPA must then give what it gave with every slot marked real.
    torch.manual_seed(0)
    q = torch.randn(2, 3, 3, 64)
    k, v = torch.randn(2, 3, 300, 64), torch.randn(2, 3, 300, 64)
    every = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=every)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), masked)
