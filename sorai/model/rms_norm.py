"""RMSNorm's inference path in a small C kernel (sorai/model/rms_norm.c).

PyTorch's fused rms_norm costs ~15 us for one 576-wide row on a 2-core AVX2 EPYC, most of it
dispatch, and a decode step runs it twice per block: with the C kernel the engine's decode steps
took 41.5 -> 38.8 ms at one sequence and 89.1 -> 84.4 ms at 16 (`benchmarks/bench_decode_step.py
--budget`, alternated with PyTorch's op). It runs where no gradient is wanted (inference;
training keeps PyTorch's op for its backward) on float32 CPU rows; elsewhere, or where no
compiler builds it (sorai/native.py), `normalize` returns None and the caller runs PyTorch's op.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from sorai import native

SOURCE = Path(__file__).with_name("rms_norm.c")
_PLAIN = (Tensor, torch.nn.Parameter)


@functools.cache
def _entry() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    library = native.load(SOURCE)
    if library is None:
        return None
    entry = library.rms_norm_f32
    entry.restype = None
    entry.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    entry.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
    return entry


def normalize(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """x normalized over its last dimension and scaled by `weight`, by the C kernel; None where
    it does not apply (a gradient wanted, a tensor subclass, not float32 on the CPU, no kernel
    built)."""
    if (
        # Plain tensors only: a tensor subclass (a DTensor under tensor or sequence
        # parallelism) has no memory of its own at data_ptr().
        type(x) is not Tensor
        or type(weight) not in _PLAIN
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return None
    entry = _entry()
    if entry is None:
        return None
    d = x.shape[-1]
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        return None
    rows = x.reshape(-1, d)  # a view for the engine's contiguous rows
    out = torch.empty(x.shape, dtype=torch.float32)
    entry(rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), rows.shape[0], d, eps)
    return out
