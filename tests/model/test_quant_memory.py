"""Low-bit layers and GGUF tables without extra copies: int4 codes read back from the kernel's
packing, float16 scales where exact, Q8_0 tables converted in row slices; KV cache sizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sorai.engine.config import DEFAULT_KV_CACHE_GIB, EngineConfig
from sorai.model.quant import gguf_blocks
from sorai.model.quant.gguf_blocks import q8_0_bytes, q8_0_rows
from sorai.model.quant.linear import Int4Linear, packed_row_block, unpack_int4

needs_known_packing = pytest.mark.skipif(
    packed_row_block(64) is None, reason="this torch build's int4 packing layout is not known"
)


@needs_known_packing
@pytest.mark.parametrize("rows", [64, 192, 576])
def test_int4_codes_come_back_from_the_packing(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    q = torch.randint(0, 16, (rows, 96), generator=generator, dtype=torch.uint8)
    scale = (torch.rand(rows, 3, generator=generator) + 0.01).to(torch.float16).float()
    minimum = -8 * scale
    layer = Int4Linear(q, scale, minimum)
    assert "nibbles" not in layer._buffers  # one copy of the codes: the kernel's
    assert torch.equal(unpack_int4(layer.packed, rows, 96), q)
    assert torch.equal(layer.codes(), q)
    groups = q.view(rows, 3, 32).float() * scale[..., None] + minimum[..., None]
    assert torch.equal(layer.dequantize(), groups.view(rows, 96))
    assert layer.scale.dtype == torch.float16  # exact in float16: stored so
    # Saved layers keep the portable form (nibbles, float32 scales), as before.
    state = layer.state_dict()
    assert torch.equal(state["nibbles"], q[:, 0::2] | (q[:, 1::2] << 4))
    assert state["scale"].dtype == state["minimum"].dtype == torch.float32


@needs_known_packing
def test_fused_int4_parts_read_their_own_codes() -> None:
    generator = torch.Generator().manual_seed(1)
    parts = [Int4Linear.quantize(torch.randn(rows, 64, generator=generator)) for rows in (128, 64)]
    codes = [p.codes().clone() for p in parts]
    joined = Int4Linear.concat(parts)
    assert joined is not None and "nibbles" not in joined._buffers
    assert torch.equal(joined.codes(), torch.cat(codes))
    assert all(torch.equal(p.codes(), c) for p, c in zip(parts, codes, strict=True))


def test_scales_that_are_not_float16_values_stay_float32() -> None:
    q = torch.zeros(64, 32, dtype=torch.uint8)
    scale = torch.full((64, 1), 0.1)  # 0.1 has no exact float16
    layer = Int4Linear(q, scale, torch.zeros(64, 1))
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)


def test_q8_0_rows_in_slices_equal_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(2)
    values = torch.randint(-127, 128, (50, 64), generator=generator, dtype=torch.int8)
    per_row = torch.rand(50, generator=generator) + 0.01
    raw = q8_0_bytes(values, per_row).copy()
    # Some rows with a different scale per block, requantized to one scale per row.
    blocks = raw.reshape(50, 2, 34)
    blocks[::3, 1, :2] = np.frombuffer(np.float16(0.003).tobytes(), dtype=np.uint8)
    whole = q8_0_rows(raw.reshape(-1), 50)
    monkeypatch.setattr(gguf_blocks, "Q8_0_CHUNK_ROWS", 7)
    sliced = q8_0_rows(raw.reshape(-1), 50)
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])


def test_kv_cache_defaults_to_one_context_window_within_the_cap() -> None:
    per_block = 2**20  # 1 MiB a block
    assert EngineConfig().kv_blocks(per_block, 8192) == 8192 // 16
    assert EngineConfig().kv_blocks(per_block, 8190) == 512  # the window rounded up to blocks
    cap = int(DEFAULT_KV_CACHE_GIB * 2**30 // per_block)
    assert EngineConfig().kv_blocks(per_block, 10**6) == cap
    assert EngineConfig(kv_cache_gib=0.5).kv_blocks(per_block, 8192) == 512
    assert EngineConfig(num_blocks=7).kv_blocks(per_block, 8192) == 7
