"""How a loaded model runs: device, activation dtype, weight formats and the machine.

Printed in the serve banner and returned by `/v1/models`, so a user can see which path
`--dtype auto` and the weights' format picked on this machine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from torch import nn

from sorai.model.hardware import machine


@dataclass(frozen=True)
class Runtime:
    device: str
    dtype: str  # of activations, norms and the KV cache
    weights: str  # the matmul weights' formats, e.g. "210 int4 (group 32), 1 int8"
    machine: str
    decode_path: str = ""  # which path low-bit layers run and why (sorai.model.quant.decode_path)

    def line(self) -> str:
        path = f"; low-bit path: {self.decode_path}" if self.decode_path else ""
        return (
            f"{self.dtype} on {self.device}; weights: {self.weights}{path}; machine: {self.machine}"
        )

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def weight_format(module: nn.Module) -> str | None:
    """A matmul layer's weight format, None for modules that are not one."""
    described = getattr(module, "weight_format", None)  # low-bit layers name theirs
    if isinstance(described, str):
        return described
    if isinstance(module, nn.Linear):
        return str(module.weight.dtype).removeprefix("torch.")
    return None


def describe(model: nn.Module, decode_path: tuple[str, str] | None = None) -> Runtime:
    counts: Counter[str] = Counter()
    for module in model.modules():
        if (fmt := weight_format(module)) is not None:
            counts[fmt] += 1
    weights = ", ".join(f"{n} {fmt}" for fmt, n in counts.most_common()) or "none"
    param = next(model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    path = f"{decode_path[0]} ({decode_path[1]})" if decode_path else ""
    return Runtime(str(param.device), dtype, weights, machine().describe(), path)
