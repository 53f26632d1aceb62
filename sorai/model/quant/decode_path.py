"""Which path a server's low-bit layers run on: fbgemm's float16 GEMM (the default where this
torch has it), PyTorch's int4/int8 kernels (default elsewhere, or on every core), or a float32
copy of their weights.

PyTorch's int4/int8 weight-only kernels expand the weights again for every few rows, so their
cost grows with the rows of a step, and prompt chunks expanded each layer's weight to float32
for every call. fbgemm's float16 GEMM (sorai.model.quant.fp16_gemm) reads half of float32's
bytes, runs every row count well and needs no expansion per call. Measured on a 2-core AVX2 AMD
EPYC, one thread (benchmarks/bench_decode_path.py: 30 blocks plus the head, ms per step at 1 /
16 sequences): int4 kernels + int8 head 21.5 / 112, float16 GEMM 15.0 / 49 (one row is run as
three: fbgemm's 1- and 2-row micro-kernels sum in another order), float32 GEMM 16.7 / 67; a
512-row prompt chunk as fast as float32 MKL. Its cost is memory: a float16 copy of each layer
that runs, its inputs padded to blocks of 512 (416 MiB for the default model, whose 576-wide
layers take 1024; the model's own low-bit weights are ~108 MB). The earlier measurements of the
kernels against float32 (a quiet 2-core Xeon; 1 / 4 / 8 / 16 sequences):
  torch limited to AVX2   int4 14.6 / 26.1 / 50.5 / 93.9   fp32 33.3 / 66.8 / 83.4 / 92.3
  its AVX-512 kernels     int4  8.7 / 14.5 / 29.2 / 55.1   fp32 29.6 / 42.0 / 66.0 / 67.6
MKL's float32 GEMM sums a row in an order that depends on the row count (a row alone and the
same row among 16 differ in the last bits), so decoding on it makes a request's tokens depend on
its batch: seeded sampling among other requests drew other tokens than alone
(tests/engine/test_engine.py). The float16 GEMM (padded to row counts that sum alike) and the
int4/int8 kernels depend on neither the batch nor the thread count. The kernels run on the
engine's decode threads (one core less than the machine has: on 2 cores shared with other work,
two OpenMP threads per kernel call ran 10-30x slower than one while libgomp's idle threads spun;
`import sorai` makes them sleep, and two are then level with one there).
SORAI_LOWBIT_DECODE=... chooses:
  auto       fp16 where fbgemm's float16 GEMM is here and its copy takes at most an eighth of
             the available memory, else kernel
  fp16       fbgemm's float16 GEMM for every row (the float16 copy packed on a layer's first use)
  kernel     the int4/int8 kernels for generated tokens, float32 GEMMs for prompt chunks: the
             least memory (the model's own low-bit bytes only)
  all-cores  the kernels on every core from ALL_CORES_FROM_ROWS rows (the same numbers; for a
             machine the server has to itself: 93.9 -> 73.8 ms at 16 sequences above)
  dense      a float32 copy of each layer's kernel weight (expanded once, on first use: ~405 MB
             for the default model), at the cost of the batch invariance
chosen once per loaded model, never per step.
"""

from __future__ import annotations

import os

from torch import nn

from sorai.errors import SoraiError
from sorai.model.hardware import machine
from sorai.model.memory import release_free_memory
from sorai.model.quant import fp16_gemm
from sorai.model.quant.linear import ALL_CORES_FROM_ROWS, LowBitLinear
from sorai.model.quant.table import Int8Head

# The float32 copies may take at most this share of the memory available at start.
MEMORY_SHARE = 0.5
# ... and the float16 copy the server makes unasked at most this share: where memory is tight
# (a small VM, a laptop running other things) the kernels' lean footprint matters more than
# the fp16 path's speed (bench_serving, 2-core EPYC: peak RSS 763 MB on the kernels, 1120 MB
# on fp16; c16 throughput 63.8 vs 85.8 tok/s, c1 TTFT 0.55 vs 0.28 s).
FP16_AUTO_SHARE = 0.125
PATHS = ("auto", "fp16", "kernel", "all-cores", "dense")
ENVIRONMENT = "SORAI_LOWBIT_DECODE"


def _decoding_layers(model: nn.Module) -> list[LowBitLinear]:
    """The low-bit layers of `model` and its fused modules (parts included: one may run by
    itself again, e.g. once a LoRA wrapper is removed)."""
    from sorai.model.fusion import fusions

    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    layers += [f.module for _, f in fusions(model) if isinstance(f.module, LowBitLinear)]
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
    """(path, why) for a server of `model` batching up to `max_num_seqs`."""
    wanted = wanted or os.environ.get(ENVIRONMENT) or "auto"
    if wanted not in PATHS:
        raise SoraiError(
            f"{ENVIRONMENT}={wanted!r} is not a decode path; choose one of {', '.join(PATHS)}"
        )
    every = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    layers = [m for m in every if not isinstance(m, Int8Head)]
    if not layers:
        return "kernel", "no low-bit layers"
    if wanted == "all-cores":
        return "all-cores", (
            f"{ENVIRONMENT}=all-cores: the low-bit kernels on every core from "
            f"{ALL_CORES_FROM_ROWS} rows"
        )
    if wanted == "kernel":
        return "kernel", "the low-bit kernels: a row's numbers do not depend on its batch"
    if wanted in ("auto", "fp16"):
        return _fp16_or_kernel(every, wanted)
    need = sum(m.in_features * m.out_features * 4 for m in layers)  # parts, not fused twice
    fits = _fits(need)
    if fits is not None:
        return "kernel", f"{ENVIRONMENT}=dense, but {fits}"
    return "dense", (
        f"{ENVIRONMENT}=dense: float32 GEMMs on a {need / 2**20:.0f} MiB copy of the weights "
        f"for batches up to {max_num_seqs} sequences on {machine().isa} kernels"
    )


def _fp16_or_kernel(layers: list[LowBitLinear], wanted: str) -> tuple[str, str]:
    asked = f"{ENVIRONMENT}=fp16, but " if wanted == "fp16" else ""
    if not fp16_gemm.supported():
        return "kernel", f"{asked}the low-bit kernels: this torch has no batch-invariant fp16 GEMM"
    need = sum(fp16_gemm.packed_bytes(m.out_features, m.in_features) for m in layers)
    fits = _fits(need, MEMORY_SHARE if wanted == "fp16" else FP16_AUTO_SHARE)
    if fits is not None:
        return "kernel", f"{asked}the low-bit kernels: {fits}"
    return "fp16", (
        f"fbgemm's float16 GEMM on a {need / 2**20:.0f} MiB float16 copy of the low-bit "
        f"weights ({machine().isa})"
    )


def _fits(need: int, share: float = MEMORY_SHARE) -> str | None:
    """None where `need` bytes fit in `share` of the memory available, else why not."""
    available = _available_bytes()
    if available is not None and need > share * available:
        return (
            f"a copy of {need / 2**20:.0f} MiB would take more than 1/{round(1 / share)} of "
            f"the {available / 2**20:.0f} MiB available"
        )
    return None


_SETTLED = "_sorai_decode_path"


def settle(model: nn.Module, max_num_seqs: int) -> tuple[str, str]:
    """The model's decode path, chosen (and set) by the first engine over it: engines sharing
    one loaded model (tests, a Python program's several engines) share its path too."""
    settled = model.__dict__.get(_SETTLED)
    if settled is None:
        settled = choose(model, max_num_seqs)
        model.__dict__[_SETTLED] = settled
    use(model, settled[0])  # again for layers fused or replaced since (copies already made stay)
    return settled


def use(model: nn.Module, path: str) -> None:
    """Set every running low-bit layer of `model` to decode on `path`; for fp16, make the
    float16 copies of the layers that run now, so that a server's memory is what it will be
    when it reports healthy, and hand the temporaries' pages back."""
    layers = _decoding_layers(model)
    for layer in layers:
        layer.all_cores_from_rows = ALL_CORES_FROM_ROWS if path == "all-cores" else None
        layer.fp16_decode = path == "fp16"
        if path != "fp16":
            layer.fp16_weight = None
        base = layer.weight_format.split(" + ")[0]
        layer.weight_format = base + (" + float16 GEMM copy" if path == "fp16" else "")
        if isinstance(layer, Int8Head):
            continue  # its kernel runs every batch; its top logits are recomputed anyway
        layer.dense_decode = path == "dense"
        if path != "dense":
            layer.dense_cache = None
        if path == "dense":
            layer.weight_format = base + " + float32 decode copy"
    if path == "fp16":
        joined = _fused_parts(model)
        made = [layer.pack_fp16() for layer in layers if id(layer) not in joined]
        if any(made):  # a later engine over the same model finds them made
            release_free_memory()


def _fused_parts(model: nn.Module) -> set[int]:
    """ids of the layers that run inside a fused module, not by themselves."""
    from sorai.model.fusion import fusions

    return {id(p) for owner, f in fusions(model) if f.still_used_by(owner) for p in f.parts}
