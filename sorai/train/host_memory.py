"""Host memory of a training run on the CPU: weights moved off the file they were mapped from, and
glibc's allocator kept from holding on to the activations' memory between and within steps."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("sorai.train")

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks at least this large are mapped for themselves and unmapped when freed: every activation
# of a real model is larger. glibc's default starts at 128 KiB but raises itself up to 32 MiB as
# such blocks are freed, after which activations come from the heap, where blocks of different
# lifetimes leave holes that the heap never gives back: about 1 GiB above the live tensors at the
# peak of a LoRA step on the default model (8 x 256 tokens).
MMAP_THRESHOLD = 1 << 20


def file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (safetensors, GGUF ...), from
    /proc/self/maps; empty where that cannot be read."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].endswith(".so"):
            start, _, end = fields[0].partition("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@torch.no_grad()
def own_weights(model: nn.Module) -> int:
    """Copy the parameters and buffers that still point into a mapped weights file into memory
    of their own; returns how many were copied.

    A loader that copies most tensors (to another dtype or layout) can leave a few, such as the
    norms' weights, as views of the file: they keep the whole mapping, every page of which was
    read while loading, resident for the whole run (about 500 MB for the default model's
    float32 safetensors)."""
    if sys.platform != "linux":
        return 0
    ranges = file_mapped_ranges()
    copied = 0
    tensors = list(model.parameters()) + list(model.buffers())
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        address = tensor.untyped_storage().data_ptr()
        if any(start <= address < end for start, end in ranges):
            tensor.data = tensor.data.clone()
            copied += 1
    return copied


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def tune_allocator() -> bool:
    """Have glibc map every block of MMAP_THRESHOLD or more by itself, so freed activations go
    back to the system at once and the peak resident set follows the live tensors. True when
    set (glibc only: musl and other systems keep their own allocator's behaviour)."""
    libc = _libc()
    if libc is None:
        return False
    # Fixing the threshold also stops glibc's own raising of it; trimming the heap top from
    # 1 MiB keeps small-object churn from pinning freed pages at the top of the heap.
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD) == 1 and ok
    if not ok:
        log.debug("mallopt refused the allocator settings")
    return ok


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def available_bytes() -> int | None:
    """Memory this machine can give a new workload now: the kernel's MemAvailable, lowered to
    what is left under this process's cgroup limit (a container's memory.max); None where
    neither can be read."""
    figures = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append(int(line.split()[1]) * 1024)  # kB
    except (OSError, ValueError, IndexError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        # v1 reports "no limit" as a huge number, larger than any machine's memory.
        if limit is not None and usage is not None and limit < 1 << 60:
            figures.append(max(0, limit - usage))
    return min(figures) if figures else None
