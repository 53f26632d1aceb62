"""Decode attention read in place from the paged KV cache: a small C kernel, built once per
machine with the system's C compiler and cached (sorai/native.py), with PyTorch's SDPA where it
cannot be used.

The gather-then-SDPA path copies every decode's keys and values out of the cache each layer,
pads them to the longest context and runs a flash kernel made for long query blocks on one
query per head; the kernel (decode_attention.c) reads each sequence's slots where they lie and
sums in a fixed order, so a row's numbers do not depend on the rest of its step.

SORAI_DECODE_ATTENTION=... chooses, once per process:
  auto    the kernel where a C compiler builds it and SORAI_NATIVE is not off, else SDPA
          (the default)
  kernel  the kernel, or an error saying why it cannot be built
  sdpa    always gather and run SDPA
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from sorai import native
from sorai.errors import SoraiError

ENVIRONMENT = "SORAI_DECODE_ATTENTION"
CHOICES = ("auto", "kernel", "sdpa")
SOURCE = Path(__file__).with_name("decode_attention.c")
# The storage dtypes the kernel reads, by the suffix of its entry point.
ENTRY_POINTS = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bf16"}
# A step's sequences are split over torch's thread count only into parts of at least this many
# context tokens: a smaller part costs more to hand to a thread than it saves.
TOKENS_PER_THREAD = 1024

log = logging.getLogger(__name__)


def choice() -> str:
    return native.choice(ENVIRONMENT, CHOICES)


@functools.cache
def kernel() -> DecodeKernel | None:
    """The built kernel, or None where SORAI_DECODE_ATTENTION or the machine rules it out."""
    wanted = choice()
    if wanted == "sdpa" or (wanted == "auto" and not native.enabled()):
        return None
    try:
        return DecodeKernel(ctypes.CDLL(str(native.build(SOURCE))))
    except native.FAILURES as error:
        if wanted == "kernel":
            raise SoraiError(
                f"{ENVIRONMENT}=kernel, but the kernel is unavailable: {error}"
            ) from error
        log.warning("decode attention falls back to SDPA: %s", error)
        return None


class DecodeKernel:
    """The loaded library's entry points, one per KV storage dtype."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.entries = {}
        for dtype, suffix in ENTRY_POINTS.items():
            entry = getattr(library, f"paged_decode_{suffix}")
            entry.restype = ctypes.c_int
            entry.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
            entry.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
            entry.argtypes += [ctypes.c_int64] * 4 + [ctypes.c_float]
            self.entries[dtype] = entry

    def supports(self, q: Tensor, key_cache: Tensor) -> bool:
        """Float32 queries over a CPU cache of a dtype it reads, with a head size of 16s."""
        heads, kv_heads, dim = q.shape[0], key_cache.shape[1], q.shape[-1]
        return (
            q.dtype == torch.float32
            and q.device.type == "cpu"
            and key_cache.dtype in self.entries
            and dim % 16 == 0
            and heads % kv_heads == 0
        )

    def __call__(
        self, q: Tensor, key_cache: Tensor, value_cache: Tensor, slots: Tensor, lengths: Tensor
    ) -> Tensor:
        """q [H, D, d] -> out [H, D, d]: sequence s's query over the first lengths[s] of its
        slots[s] in key_cache/value_cache [slots, n_kv_heads, d]."""
        return torch.ops.sorai.paged_decode_attention(
            q, key_cache, value_cache, slots, lengths
        ).permute(1, 0, 2)

    def run(
        self, q: Tensor, key_cache: Tensor, value_cache: Tensor, slots: Tensor, lengths: Tensor
    ) -> Tensor:
        """The call itself, out [D, H, d], on torch's thread count where the step is long
        enough (parts(); each sequence is computed alike in any part, so the numbers do not
        depend on the threads)."""
        heads, num, dim = q.shape
        if q.stride(-1) != 1:
            q = q.contiguous()
        assert key_cache.is_contiguous() and value_cache.is_contiguous()
        assert slots.dtype == lengths.dtype == torch.int64 and slots.stride(-1) == 1
        lengths = lengths.contiguous()
        out = torch.empty(num, heads, dim, dtype=q.dtype)
        entry = self.entries[key_cache.dtype]
        ptr = key_cache.data_ptr(), value_cache.data_ptr()
        q_size, out_row = q.element_size(), heads * dim * out.element_size()

        def call(start: int, end: int) -> int:
            return entry(
                q.data_ptr() + start * q.stride(1) * q_size,
                q.stride(1),
                q.stride(0),
                *ptr,
                slots.data_ptr() + start * slots.stride(0) * 8,
                slots.stride(0),
                lengths.data_ptr() + start * 8,
                out.data_ptr() + start * out_row,
                end - start,
                heads,
                key_cache.shape[1],
                dim,
                dim**-0.5,
            )

        threads = torch.get_num_threads()
        ranges = parts(lengths.tolist(), threads) if threads > 1 and num > 1 else [(0, num)]
        futures = [_pool().submit(call, *r) for r in ranges[1:]]
        failed = [call(*ranges[0]), *(f.result() for f in futures)]
        if any(failed):
            raise MemoryError("decode attention: no memory for the score rows")
        return out


def parts(lengths: list[int], threads: int) -> list[tuple[int, int]]:
    """Consecutive ranges of sequences with about equal context tokens each, at most `threads`
    of them and none under TOKENS_PER_THREAD tokens (one range where the step is short)."""
    total = sum(lengths)
    count = max(1, min(threads, len(lengths), total // TOKENS_PER_THREAD))
    ranges, start, seen = [], 0, 0
    for i, n in enumerate(lengths):
        seen += n
        if len(ranges) < count - 1 and seen * count >= total * (len(ranges) + 1):
            ranges.append((start, i + 1))
            start = i + 1
    ranges.append((start, len(lengths)))
    return [r for r in ranges if r[0] < r[1]]


@functools.cache
def _pool() -> ThreadPoolExecutor:
    # ctypes releases the GIL for the call: the parts run on cores at once.
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="decode-attn")


# A forked child has none of the parent's pool threads: it starts a pool of its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


# An operator, not a bare call: the profiler names it, and torch.compile treats it as one
# opaque op (shapes from the fake below) instead of breaking its graph at a ctypes call.
_library = torch.library.Library("sorai", "FRAGMENT")
_library.define(
    "paged_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor slots, "
    "Tensor lengths) -> Tensor"
)


def _paged_decode_attention(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, slots: Tensor, lengths: Tensor
) -> Tensor:
    built = kernel()
    if built is None:
        raise SoraiError(f"the decode attention kernel is not built ({ENVIRONMENT}={choice()})")
    return built.run(q, key_cache, value_cache, slots, lengths)


_library.impl("paged_decode_attention", _paged_decode_attention, "CPU")


@torch.library.register_fake("sorai::paged_decode_attention")
def _shape(q: Tensor, key_cache: Tensor, value_cache: Tensor, slots: Tensor, lengths: Tensor):
    return q.new_empty(q.shape[1], q.shape[0], q.shape[2])
