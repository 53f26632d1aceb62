"""How much memory fine-tuning takes per device, worked out from the ModelConfig alone: nothing
is instantiated. `sorai train --estimate` prints `estimate_memory(...).report()`.

By question: layout.py (the parallel layout: the trainer's ParallelDims and pipeline split),
parameters.py (parameter counts, per rank), activations.py (what autograd keeps), memory.py
(per-rank memory under the ZeRO stage, tp and pp; the ZeRO stages side by side), report.py (the
table and its notes). Named architectures live in sorai.model.architectures.

What is not counted: the CUDA context, the allocator's caching and fragmentation, the transient
gradients of activations during backward, kernel workspaces, and the data batch itself.
"""

from sorai.train.estimate.layout import SINGLE_DEVICE, Layout, LayoutError
from sorai.train.estimate.memory import estimate_memory, zero_stages
from sorai.train.estimate.parameters import (
    RankParameters,
    count_parameters,
    lora_parameters,
    lora_target_names,
    rank_parameters,
)
from sorai.train.estimate.report import (
    GIB,
    MIB,
    MemoryEstimate,
    ZeroStage,
    ZeroStages,
    format_bytes,
)

__all__ = [
    "GIB",
    "MIB",
    "SINGLE_DEVICE",
    "Layout",
    "LayoutError",
    "MemoryEstimate",
    "RankParameters",
    "ZeroStage",
    "ZeroStages",
    "count_parameters",
    "estimate_memory",
    "format_bytes",
    "lora_parameters",
    "lora_target_names",
    "rank_parameters",
    "zero_stages",
]
