"""Which path a server's low-bit layers decode on: the kernels (default, or on every core) or a
float32 copy of their weights.

PyTorch's int4/int8 weight-only kernels expand the weights again for every few rows, so their
cost grows with the rows of a step; a float32 GEMM reads four times the bytes but handles large
batches better on an AVX2-only CPU. Measured in one process on 2 cores of a quiet Xeon
(benchmarks/bench_decode_path.py: the default model's 30 blocks, ms per decode step at 1 / 4 /
8 / 16 sequences, one thread):
  torch limited to AVX2   int4 14.6 / 26.1 / 50.5 / 93.9   fp32 33.3 / 66.8 / 83.4 / 92.3
  its AVX-512 kernels     int4  8.7 / 14.5 / 29.2 / 55.1   fp32 29.6 / 42.0 / 66.0 / 67.6
(a 2-core AVX2 AMD EPYC: a whole engine step at 16 sequences ~170 ms int4, ~100 ms float32).
But MKL's float32 GEMM sums a row in an order that depends on the row count (a row alone and
the same row among 16 differ in the last bits, on both machines), so decoding on it makes a
request's tokens depend on its batch: seeded sampling among other requests drew other tokens
than alone (tests/engine/test_engine.py). The kernels' results depend on neither the batch nor
the thread count, so the default stays on them, on the engine's decode threads (one core less
than the machine has: on 2 cores shared with other work, two OpenMP threads per kernel call ran
10-30x slower than one while libgomp's idle threads spun; `import sorai` now makes them sleep,
and two are then level with one there). Two opt-ins, SORAI_LOWBIT_DECODE=...:
  all-cores  the kernels on every core from ALL_CORES_FROM_ROWS rows (the same numbers; for a
             machine the server has to itself: 93.9 -> 73.8 ms at 16 sequences above)
  dense      a float32 copy of each layer's kernel weight (expanded once, on first use: ~405 MB
             for the default model, where it fits in half the available memory), for large
             batches on AVX2-only CPUs, at the cost of that invariance
chosen once per loaded model, never per step.
"""

from __future__ import annotations

import os

from torch import nn

from sorai.errors import SoraiError
from sorai.model.hardware import machine
from sorai.model.quant.linear import ALL_CORES_FROM_ROWS, LowBitLinear
from sorai.model.quant.table import Int8Head

# The float32 copies may take at most this share of the memory available at start.
MEMORY_SHARE = 0.5
PATHS = ("auto", "kernel", "all-cores", "dense")
ENVIRONMENT = "SORAI_LOWBIT_DECODE"


def _decoding_layers(model: nn.Module) -> list[LowBitLinear]:
    """The low-bit layers that run (fused ones included)."""
    from sorai.model.fusion import FUSED_ATTRIBUTE

    layers: list[LowBitLinear] = []
    for module in model.modules():
        found = module.__dict__.get(FUSED_ATTRIBUTE)
        for candidate in (module, getattr(found, "module", None)):
            if isinstance(candidate, LowBitLinear):
                layers.append(candidate)
    return layers


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose(model: nn.Module, max_num_seqs: int, wanted: str | None = None) -> tuple[str, str]:
    """('kernel' or 'dense', why) for a server of `model` batching up to `max_num_seqs`."""
    wanted = wanted or os.environ.get(ENVIRONMENT) or "auto"
    if wanted not in PATHS:
        raise SoraiError(
            f"{ENVIRONMENT}={wanted!r} is not a decode path; choose one of {', '.join(PATHS)}"
        )
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    layers = [m for m in layers if not isinstance(m, Int8Head)]
    if not layers:
        return "kernel", "no low-bit layers"
    if wanted == "all-cores":
        return "all-cores", (
            f"{ENVIRONMENT}=all-cores: the low-bit kernels on every core from "
            f"{ALL_CORES_FROM_ROWS} rows"
        )
    if wanted != "dense":
        return "kernel", "the low-bit kernels: a row's numbers do not depend on its batch"
    need = sum(m.in_features * m.out_features * 4 for m in layers)  # parts, not fused twice
    available = _available_bytes()
    if available is not None and need > MEMORY_SHARE * available:
        return "kernel", (
            f"{ENVIRONMENT}=dense, but a float32 copy ({need / 2**20:.0f} MiB) would not fit in "
            f"half of the {available / 2**20:.0f} MiB available"
        )
    return "dense", (
        f"{ENVIRONMENT}=dense: float32 GEMMs on a {need / 2**20:.0f} MiB copy of the weights "
        f"for batches up to {max_num_seqs} sequences on {machine().isa} kernels"
    )


_SETTLED = "_sorai_decode_path"


def settle(model: nn.Module, max_num_seqs: int) -> tuple[str, str]:
    """The model's decode path, chosen (and set) by the first engine over it: engines sharing
    one loaded model (tests, a Python program's several engines) share its path too."""
    settled = model.__dict__.get(_SETTLED)
    if settled is None:
        settled = choose(model, max_num_seqs)
        use(model, settled[0])
        model.__dict__[_SETTLED] = settled
    return settled


def use(model: nn.Module, path: str) -> None:
    """Set every running low-bit layer of `model` to decode on `path`."""
    for layer in _decoding_layers(model):
        layer.all_cores_from_rows = ALL_CORES_FROM_ROWS if path == "all-cores" else None
        if isinstance(layer, Int8Head):
            continue  # its kernel runs every batch; its top logits are recomputed anyway
        layer.dense_decode = path == "dense"
        if path != "dense":
            layer.dense_cache = None
        base = layer.weight_format.split(";")[0]
        layer.weight_format = f"{base}; float32 decode copy" if path == "dense" else base
