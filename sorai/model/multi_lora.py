"""Many LoRA adapters over one shared base model, mixed in one batch (the Punica/S-LoRA idea).

The base weights are never touched: a forward hook on each adapted projection (or on the
fused q/k/v and gate/up modules, sorai.model.fusion) adds, to each row of the step's flat token
row, the delta x·Aᵀ·Bᵀ·scaling of that row's adapter, computed on the fly. Base rows get none.

Adapters live in `slots` (at most max_loras resident): per hooked module one stacked A
[slots, parts·max_rank, in] and per part one B [slots, out, max_rank] (scaling folded in,
float32). Ranks are padded with zeros to max_rank, so adapters of any rank up to it share the
stacks; a step computes only up to the largest rank it uses. A module an adapter does not
target stays zero in its slot and is skipped where rows are grouped. Stacks are allocated
the first time an adapter targets their module, so q/v-only adapters cost no MLP memory.

Two ways to apply the deltas, both plain torch ops:
- segment: a run of rows of one adapter (a prompt chunk) takes two matmuls (x·Aᵀ for every
  part at once, then ·Bᵀ per part into the output's columns), a few ops per run per module;
- gather: each row gathers its slot's A and B (or, for rows of at most BROADCAST_MAX_RUNS
  adapters, broadcasts them) and elementwise products summed per row, always over max_rank,
  do every row at once whatever the number of adapters.
The engine gathers generated tokens (one row per sequence) and segments prompt tokens: a row's
path depends on its token, never on what else shares the step, so a request's tokens are the
same alone or in any batch (as the low-bit layers do, sorai.model.quant.linear). Measured on a
2-core AVX2 CPU (benchmarks/bench_lora.py --kernels), decode steps over 4 or 16 adapters gather
faster than they segment, and prompt chunks segment faster than they gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sorai.model.fusion import FUSED_ATTRIBUTE, Fused
from sorai.model.lora import AdapterFile, LoRAError, linear_shapes
from sorai.model.transformer import Transformer

# Gathered rows of at most this many adapters (runs) broadcast each adapter's weights rather
# than copying them per row: fewer bytes moved, a few more ops per run.
BROADCAST_MAX_RUNS = 2


@dataclass
class StepRows:
    """Which adapter slot each row of a step's flat token row uses (built by plan())."""

    runs: list[tuple[int, int, int]]  # segmented rows: (slot, start, end), contiguous
    rank: int  # the largest rank among the slots used
    rows: Tensor | None = None  # gathered rows' indices (None: every row of the step)
    slots: Tensor | None = None  # each gathered row's slot (None: no row is gathered)
    # The gathered rows as (slot, start, end) runs of their list, when there are few: each
    # run then broadcasts its slot's weights instead of copying them per row.
    gathered_runs: list[tuple[int, int, int]] | None = None


class _Target:
    """One hooked module: a projection, or a fused group whose output holds its parts side by
    side. Holds the stacked adapter weights for it."""

    def __init__(
        self, names: Sequence[str], sizes: Sequence[int], in_features: int, owner: MultiLoRA
    ) -> None:
        self.names = tuple(names)
        self.sizes = tuple(sizes)
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.in_features = in_features
        self.owner = owner
        self.a: Tensor | None = None  # [slots, parts * max_rank, in]
        self.b: list[Tensor] = []  # per part [slots, out, max_rank]
        self.present: list[set[int]] = [set() for _ in self.names]  # slots per part

    def _allocate(self) -> None:
        o = self.owner
        parts = len(self.names)
        shape = (o.max_loras, parts * o.max_rank, self.in_features)
        self.a = torch.zeros(shape, dtype=o.dtype, device=o.device)
        self.b = [
            torch.zeros(o.max_loras, size, o.max_rank, dtype=o.dtype, device=o.device)
            for size in self.sizes
        ]

    def load(self, slot: int, adapter: AdapterFile) -> None:
        """Write the adapter's parts for this module into `slot` (zeros where it has none)."""
        r_max = self.owner.max_rank
        wanted = [name in adapter.modules for name in self.names]
        if self.a is None:
            if not any(wanted):
                return
            self._allocate()
        assert self.a is not None
        with torch.no_grad():
            self.a[slot].zero_()
            for p, name in enumerate(self.names):
                self.b[p][slot].zero_()
                self.present[p].discard(slot)
                if not wanted[p]:
                    continue
                module = adapter.modules[name]
                r = module.r
                self.a[slot, p * r_max : p * r_max + r] = module.lora_A.to(self.a.dtype)
                scaled = module.lora_B.float() * adapter.scaling(name)
                self.b[p][slot, :, :r] = scaled.to(self.a.dtype)
                self.present[p].add(slot)

    def clear(self, slot: int) -> None:
        for present in self.present:
            present.discard(slot)

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        step = self.owner.step
        if step is None or self.a is None:
            return out
        x = inputs[0]
        x2 = x.reshape(-1, self.in_features)
        out2 = out.view(-1, out.shape[-1])
        if step.slots is not None:
            self._gather(step, x2, out2)
        if step.runs:
            self._segment(step, x2, out2)
        return out

    def _segment(self, step: StepRows, x: Tensor, out: Tensor) -> None:
        r_max, a = self.owner.max_rank, self.a
        assert a is not None
        for slot, start, end in step.runs:
            parts = [p for p, present in enumerate(self.present) if slot in present]
            if not parts:
                continue
            xs = x[start:end].to(a.dtype)
            h = torch.mm(xs, a[slot].t())  # [rows, parts * max_rank]
            for p in parts:
                col = self.starts[p]
                r = self.owner.ranks[slot]
                delta = torch.mm(h[:, p * r_max : p * r_max + r], self.b[p][slot, :, :r].t())
                out[start:end, col : col + self.sizes[p]] += delta.to(out.dtype)

    def _gather(self, step: StepRows, x: Tensor, out: Tensor) -> None:
        # Always the full max_rank (zero-padded): a row's sums then have the same length
        # whatever ranks share the step, so its result does not depend on them.
        r, a = self.owner.max_rank, self.a
        assert a is not None and step.slots is not None
        xs = x if step.rows is None else x.index_select(0, step.rows)
        xs = xs.to(a.dtype)
        # Products summed row by row rather than bmm: bmm's result for one row changes with
        # the number of rows beside it, which could flip a near-tie. A run broadcasting one
        # slot's weights computes the very same products and sums as rows gathering copies.
        runs = step.gathered_runs
        if runs is None:
            h = (a.index_select(0, step.slots) * xs[:, None, :]).sum(-1)  # [rows, parts * r]
        else:
            h = xs.new_empty(xs.shape[0], a.shape[1])
            for slot, start, end in runs:
                h[start:end] = (a[slot][None] * xs[start:end, None, :]).sum(-1)
        for p, b in enumerate(self.b):
            if not self.present[p]:
                continue
            hp = h[:, None, p * r : (p + 1) * r]
            if runs is None:
                delta = (b.index_select(0, step.slots) * hp).sum(-1)  # [rows, out]
            else:
                delta = xs.new_empty(xs.shape[0], b.shape[1])
                for slot, start, end in runs:
                    delta[start:end] = (b[slot][None] * hp[start:end]).sum(-1)
            cols = out[:, self.starts[p] : self.starts[p] + self.sizes[p]]
            if step.rows is None:
                cols += delta.to(out.dtype)
            else:
                cols.index_add_(0, step.rows, delta.to(out.dtype))


class MultiLoRA:
    """Adapter slots over a Transformer's block Linears; install() hooks them once.

    load(slot, adapter) writes an adapter (read by sorai.model.lora.read_adapter) into a slot;
    within `with rows(slot_per_row):` a forward adds each row's adapter delta.
    """

    def __init__(
        self, model: Transformer, max_loras: int, max_rank: int, dtype: torch.dtype = torch.float32
    ) -> None:
        if max_loras < 1 or max_rank < 1:
            raise LoRAError(
                f"max_loras and max_lora_rank must be >= 1, got {max_loras} and {max_rank}"
            )
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = model.device
        self.shapes = linear_shapes(model)
        self.step: StepRows | None = None
        self.ranks = [0] * max_loras
        self.targets: list[_Target] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._install()

    def _install(self) -> None:
        for block_name, block in self.model.layers.items():
            prefix = f"layers.{block_name}"
            groups = (
                (block.self_attn, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                (block.mlp, "mlp", ("gate_proj", "up_proj", "down_proj")),
            )
            for owner, owner_name, names in groups:
                fused: Fused | None = owner.__dict__.get(FUSED_ATTRIBUTE)
                fused_parts = {id(p) for p in fused.parts} if fused is not None else set()
                if fused is not None:
                    # The fused module stands for its parts; the parts themselves never run.
                    part_names = [n for n in names if id(getattr(owner, n)) in fused_parts]
                    self._hook(fused.module, [f"{prefix}.{owner_name}.{n}" for n in part_names])
                for name in names:
                    if id(getattr(owner, name)) not in fused_parts:
                        self._hook(getattr(owner, name), [f"{prefix}.{owner_name}.{name}"])

    def _hook(self, module: nn.Module, names: list[str]) -> None:
        sizes = [self.shapes[n][1] for n in names]
        target = _Target(names, sizes, self.shapes[names[0]][0], self)
        self.targets.append(target)
        self._handles.append(module.register_forward_hook(target.hook))

    def remove(self) -> None:
        """Take the hooks off: the model runs as the plain base again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check(self, adapter: AdapterFile) -> None:
        """LoRAError naming why the adapter cannot take a slot here."""
        if adapter.rank > self.max_rank:
            raise LoRAError(
                f"{adapter.path}: rank {adapter.rank} is above this server's --max-lora-rank "
                f"{self.max_rank}"
            )

    def load(self, slot: int, adapter: AdapterFile) -> None:
        self.check(adapter)
        for target in self.targets:
            target.load(slot, adapter)
        self.ranks[slot] = adapter.rank

    def clear(self, slot: int) -> None:
        for target in self.targets:
            target.clear(slot)
        self.ranks[slot] = 0

    def plan(
        self, slot_per_row: Sequence[int], gathered: bool | Sequence[bool] = False
    ) -> StepRows | None:
        """How a step whose rows use these slots (-1: base) applies its deltas; None when no
        row uses an adapter. gathered: per row (or for all), whether it is gathered rather
        than segmented; the engine gathers its generated tokens (see the module docstring)."""
        flags = [gathered] * len(slot_per_row) if isinstance(gathered, bool) else gathered
        runs: list[tuple[int, int, int]] = []
        index: list[int] = []
        slots: list[int] = []
        for i, (slot, gather) in enumerate(zip(slot_per_row, flags, strict=True)):
            if slot < 0:
                continue
            if gather:
                index.append(i)
                slots.append(slot)
            elif runs and runs[-1][0] == slot and runs[-1][2] == i:
                runs[-1] = (slot, runs[-1][1], i + 1)
            else:
                runs.append((slot, i, i + 1))
        used = {slot for slot, _, _ in runs} | set(slots)
        if not used:
            return None
        step = StepRows(runs, max(self.ranks[slot] for slot in used))
        if slots:
            device = self.model.device
            step.slots = torch.tensor(slots, dtype=torch.long, device=device)
            gathered_runs: list[tuple[int, int, int]] = []
            for i, slot in enumerate(slots):
                if gathered_runs and gathered_runs[-1][0] == slot:
                    gathered_runs[-1] = (slot, gathered_runs[-1][1], i + 1)
                else:
                    gathered_runs.append((slot, i, i + 1))
            if len(gathered_runs) <= BROADCAST_MAX_RUNS:
                step.gathered_runs = gathered_runs
            if len(index) != len(slot_per_row):
                step.rows = torch.tensor(index, dtype=torch.long, device=device)
        return step

    @contextlib.contextmanager
    def rows(
        self, slot_per_row: Sequence[int], gathered: bool | Sequence[bool] = False
    ) -> Iterator[None]:
        """Within the block, row i of a forward's flat token row runs adapter slot
        slot_per_row[i] (-1: the base alone); `gathered` as in plan()."""
        self.step = self.plan(slot_per_row, gathered)
        try:
            yield
        finally:
            self.step = None
