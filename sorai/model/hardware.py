"""What this machine can run fast: CPU instruction sets read at run time, and the GPU if any.

sorai picks dtypes and kernels from these facts (bf16 only where the CPU has bf16 dot products,
low-bit matmuls where they beat dense), so the same install runs well on an AVX2 laptop, an
AVX-512/AMX server and a GPU box.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

# Instruction sets worth naming in a banner or a benchmark, in order of interest.
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls beat float32 on the CPU: AVX-512 BF16 or AMX tiles.

    On AVX2 alone bf16 is converted element by element and runs slower than float32.
    """
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    flags: tuple[str, ...]  # the REPORTED_FLAGS this CPU has
    isa: str  # torch's own pick of vector kernels: DEFAULT, AVX2, AVX512, ...
    gpu: str | None

    def describe(self) -> str:
        flags = " ".join(self.flags) or "none of " + " ".join(REPORTED_FLAGS[:4])
        gpu = f"; GPU {self.gpu}" if self.gpu else ""
        return f"{self.cpu}, {self.cores} cores, {flags} (torch kernels: {self.isa}){gpu}"


@functools.cache
def machine() -> Machine:
    flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Machine(
        cpu=cpu_name(),
        cores=cpu_count(),
        flags=tuple(f for f in REPORTED_FLAGS if f in flags),
        isa=torch.backends.cpu.get_cpu_capability(),
        gpu=gpu,
    )


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype `--dtype auto` picks on `device`, and why (for the banner)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bfloat16 on a GPU that has it"
        return torch.float16, "float16: this GPU lacks bfloat16"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "bfloat16: this CPU has bf16 dot products (AVX-512 BF16 / AMX)"
    return torch.float32, "float32: this CPU has no bf16 dot products, where bfloat16 runs slower"
