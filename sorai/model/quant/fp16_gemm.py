"""float16 weights through fbgemm's GEMM, each row's result independent of its batch.

PyTorch ships fbgemm's float16-weight GEMM (`quantized.linear_dynamic_fp16`: float32
activations, float16 weights packed once, float32 accumulation and output). On a 2-core AVX2
EPYC it ran the default model's 30 blocks plus its head in 9.8 ms for one row (int4 kernel +
int8 head: 21.5 ms) and 49 ms for 16 rows (112 ms), and large prompt chunks as fast as MKL's
float32 GEMM without expanding low-bit weights for every call (benchmarks/bench_decode_path.py).

fbgemm cuts a call's rows into micro-kernels of 1 to 6 rows (AVX2; up to 14 on AVX-512), and
the 1- and 2-row kernels sum in another order than the others: a row alone and the same row
among 15 others differ in the last bits. So calls are padded with zero rows to a row count
whose micro-kernels all sum alike (`padded_rows`). Those counts are found on this machine at
first use by running a small GEMM at every count against rows computed six at a time, so no
table of fbgemm's internals is assumed; where no such count is found the path is not offered.
Threads split a call's output columns, never a dot product, so the thread count does not
change a result either (tests/model/test_fp16_gemm.py).
"""

from __future__ import annotations

import bisect
import functools
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

# Row counts checked at first use; larger calls run in slices of the largest good count.
CHECKED_ROWS = 256
# The rows per call a reference computes with (the widest AVX2 micro-kernel).
REFERENCE_ROWS = 6
# Padded calls up to this many rows (decode steps) reuse a buffer per shape instead of a new one.
SCRATCH_ROWS = 64


def supported() -> bool:
    """Whether this torch build has fbgemm's float16 GEMM and it can be made batch-invariant."""
    return invariant_rows() is not None


def pack(weight: Tensor) -> Any:
    """weight [out, in] packed as fbgemm's float16 matrix (an opaque torch object)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fbgemm's note that values beyond float16 saturate
        return torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)


def unpack(packed: Any) -> Tensor:
    """The float32 weight [out, in] a pack holds (its float16 values)."""
    return torch.ops.quantized.linear_unpack_fp16(packed)[0]


def linear(rows: Tensor, packed: Any, out_features: int) -> Tensor:
    """rows [n, in] float32 times the packed [out, in] weight: [n, out] float32, each row's
    result the same in any batch."""
    good = invariant_rows()
    assert good is not None, "fp16_gemm.linear on a machine where supported() is False"
    n = rows.shape[0]
    if n == 0:
        return rows.new_empty(0, out_features)
    widest = good[-1]
    if n > widest:
        return torch.cat(
            [linear(rows[i : i + widest], packed, out_features) for i in range(0, n, widest)]
        )
    padded = padded_rows(n)
    if padded == n:
        return torch.ops.quantized.linear_dynamic_fp16(rows, packed)
    full = _scratch(padded, rows.shape[1]) if padded <= SCRATCH_ROWS else None
    if full is None:
        full = rows.new_zeros(padded, rows.shape[1])
    full[:n] = rows
    return torch.ops.quantized.linear_dynamic_fp16(full, packed)[:n]


_SCRATCH = threading.local()


def _scratch(rows: int, width: int) -> Tensor:
    """A float32 [rows, width] buffer for padded calls, one per shape and thread (engines of
    several models may step at once). Its pad rows hold whatever an earlier call left: a row's
    result depends on its own values only, so they need no zeroing."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get((rows, width))
    if buffer is None:
        buffer = buffers[(rows, width)] = torch.zeros(rows, width)
    return buffer


def padded_rows(n: int) -> int:
    """The least row count >= n whose result rows equal those of any other good count."""
    good = invariant_rows()
    assert good is not None
    return good[bisect.bisect_left(good, n)]


@functools.cache
def invariant_rows() -> tuple[int, ...] | None:
    """The row counts up to CHECKED_ROWS whose calls give every row the reference's bits."""
    op = getattr(torch.ops.quantized, "linear_dynamic_fp16", None)
    if op is None or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    generator = torch.Generator().manual_seed(0)
    # Widths like a model's (several of fbgemm's column and depth blocks), values of both signs.
    weight = torch.randn(80, 320, generator=generator)
    x = torch.randn(CHECKED_ROWS, 320, generator=generator)
    try:
        packed = pack(weight)
        reference = torch.cat(
            [
                op(x[i : i + REFERENCE_ROWS], packed)
                for i in range(0, CHECKED_ROWS - REFERENCE_ROWS + 1, REFERENCE_ROWS)
            ]
        )
    except RuntimeError:
        return None
    good = tuple(
        n for n in range(1, len(reference) + 1) if torch.equal(op(x[:n], packed), reference[:n])
    )
    # Usable only if every count has a good one not far above it (at most a few zero rows).
    gap = max((b - a for a, b in zip(good, good[1:], strict=False)), default=0)
    if not good or good[0] > REFERENCE_ROWS or good[-1] < 64 or gap > REFERENCE_ROWS:
        return None
    return good
