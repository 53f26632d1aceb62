"""GGUF's quantized blocks straight into low-bit layers, without a float copy of the model.

Q4_0, Q4_1 and Q4_K hold 4-bit values with a scale and a minimum per 32 weights: exactly an
Int4Linear (group 32). Q8_0 holds int8 values with a scale per 32 weights; an Int8Linear has one
scale per row, so its rows are rescaled (error at most half a step of the row's scale).
Byte layouts follow ggml (and the gguf package's reference dequantizers). The encoders at the
end go the other way, for writing sorai's own low-bit layers into a GGUF that llama.cpp runs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _split(blocks: np.ndarray, *sizes: int) -> list[np.ndarray]:
    return np.hsplit(blocks, list(np.cumsum(sizes)))


def _half(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, per_block: int) -> np.ndarray:
    """ggml's nibble order: low halves are the first 16 (of 32) values, high halves the rest."""
    n = qs.shape[0]
    low, high = qs & 0x0F, qs >> 4
    return np.concatenate((low.reshape(n, -1, 1, 16), high.reshape(n, -1, 1, 16)), axis=2).reshape(
        n, per_block
    )


def int4_groups(raw: np.ndarray, qtype: str, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q uint8 [rows, cols], scale [rows, cols/32], minimum [rows, cols/32]) from the bytes."""
    if qtype == "Q4_0":
        d, qs = _split(raw.reshape(-1, 18), 2)
        scale = _half(d)[:, 0]
        q = _nibbles(qs, 32)
        minimum = -8 * scale
    elif qtype == "Q4_1":
        d, m, qs = _split(raw.reshape(-1, 20), 2, 2)
        scale, minimum = _half(d)[:, 0], _half(m)[:, 0]
        q = _nibbles(qs, 32)
    elif qtype == "Q4_K":
        import gguf

        blocks = raw.reshape(-1, 144)
        d, dmin, scales, qs = _split(blocks, 2, 2, 12)
        sc, mins = gguf.quants.Q4_K.get_scale_min(scales)
        scale = (_half(d) * sc.astype(np.float32)).reshape(-1)  # 8 groups of 32 per block
        minimum = (-_half(dmin) * mins.astype(np.float32)).reshape(-1)
        # Each 64 values: 32 bytes whose low nibbles are the first 32, high nibbles the next.
        qs = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 32)
    else:
        raise ValueError(f"{qtype} is not a 4-bit group type ({', '.join(INT4_TYPES)})")
    q_t = torch.from_numpy(np.ascontiguousarray(q, dtype=np.uint8)).reshape(rows, -1)
    scale_t = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(rows, -1)
    min_t = torch.from_numpy(np.ascontiguousarray(minimum, dtype=np.float32)).reshape(rows, -1)
    return q_t, scale_t, min_t


def q8_0_rows(raw: np.ndarray, rows: int) -> tuple[Tensor, Tensor]:
    """(q int8 [rows, cols], scale float32 [rows]): Q8_0's per-32 scales folded into one per row.

    A row whose blocks all share one scale (as `q8_0_bytes` writes them) is taken as it is;
    the others are requantized from their values.
    """
    blocks = raw.reshape(rows, -1, 34)
    q_row = torch.empty(rows, blocks.shape[1] * 32, dtype=torch.int8)
    row_scale = torch.empty(rows)
    # A slice of rows at a time: the float32 values of a whole token table (113 MB for the
    # default model) and the requantization's temporaries, several times that, raised the
    # load's peak RSS by ~270 MB; row by row the results are the same.
    for start in range(0, rows, Q8_0_CHUNK_ROWS):
        end = min(start + Q8_0_CHUNK_ROWS, rows)
        q_row[start:end], row_scale[start:end] = _q8_0_rows(blocks[start:end])
    return q_row, row_scale


# Rows of a Q8_0 tensor converted at a time (about 9 MB of float32 temporaries for 576 columns).
Q8_0_CHUNK_ROWS = 4096


def _q8_0_rows(blocks: np.ndarray) -> tuple[Tensor, Tensor]:
    from sorai.model.quant.linear import quantize_rows_int8

    rows = blocks.shape[0]
    d = torch.from_numpy(_half(blocks[..., :2])).reshape(rows, -1)  # [rows, cols/32]
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)).reshape(rows, -1)
    q_row, row_scale = quantize_rows_int8(
        (q.view(rows, d.shape[1], 32).to(torch.float32) * d[..., None]).view(rows, -1)
    )
    shared = (d == d[:, :1]).all(dim=1)
    q_row[shared], row_scale[shared] = q[shared], d[shared, 0]
    return q_row, row_scale


def fp16_exact(t: Tensor) -> bool:
    """Whether every value survives a round trip through float16 (a GGUF block's scale type)."""
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t))


def _fp16_bytes(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).numpy().view(np.uint8)


def q4_1_bytes(q: Tensor, scale: Tensor, minimum: Tensor) -> np.ndarray:
    """Q4_1 blocks [rows, cols/32 * 20] holding int4 groups of 32: q uint8 [rows, cols] in
    0..15, scale and minimum [rows, cols/32] (rounded to float16, exact where they are fp16)."""
    rows, cols = q.shape
    nibbles = q.to(torch.uint8).numpy().reshape(rows, cols // 32, 2, 16)
    qs = nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)  # ggml: value j low, value j + 16 high
    d = _fp16_bytes(scale.reshape(rows, -1, 1))
    m = _fp16_bytes(minimum.reshape(rows, -1, 1))
    return np.concatenate((d, m, qs), axis=-1).reshape(rows, -1)


def q8_0_bytes(q: Tensor, scale: Tensor) -> np.ndarray:
    """Q8_0 blocks [rows, cols/32 * 34] of int8 rows (q [rows, cols], one scale per row, rounded
    to float16): every block of a row carries the row's scale, so q8_0_rows reads it back as is."""
    rows, cols = q.shape
    d = _fp16_bytes(scale.reshape(rows, 1, 1).expand(rows, cols // 32, 1).contiguous())
    qs = q.to(torch.int8).numpy().view(np.uint8).reshape(rows, cols // 32, 32)
    return np.concatenate((d, qs), axis=-1).reshape(rows, -1)
