"""Many LoRA adapters over one shared base model, mixed in one batch (the Punica/S-LoRA idea).

The base weights are never touched: a forward hook on each adapted projection (or on the
fused q/k/v and gate/up modules, sorai.model.fusion) adds, to each row of the step's flat token
row, the delta x·Aᵀ·Bᵀ·scaling of that row's adapter, computed on the fly. Base rows get none.

Adapters live in `slots` (at most max_loras resident): per hooked module one stacked A
[slots, in, parts·max_rank] and per part one B [slots, max_rank, out] (scaling folded in,
float32). Ranks are padded with zeros to max_rank, so adapters of any rank up to it share the
stacks. A module an adapter does not target stays zero in its slot and is skipped where rows
are grouped. Stacks are allocated the first time an adapter targets their module, and hold
only as many slots as the highest one loaded so far (slots are taken lowest first), so
q/v-only adapters cost no MLP memory and a few adapters cost a few slots.

Two ways to apply the deltas, both plain torch ops:
- segment: a run of rows of one adapter (a prompt chunk) takes two matmuls (x·Aᵀ for every
  part at once, then ·Bᵀ per part into the output's columns), over the adapter's own rank;
- gather: every row is an item of one batched matmul (bmm) with its slot's weights, over the
  full max_rank: rows of distinct slots read them as one view of the stacks (rows of adjacent
  slots), rows of one slot share its weights (expanded), other mixes copy each row's (see
  _batches); one bmm per module and part, whatever the number of adapters.
The engine gathers generated tokens (one row per sequence) and segments prompt tokens. Every
gathered row is an item of its own (one row, the same shapes, whatever shares the step), and
MKL's batched matmul computes one-row items bit for bit alike whatever the batch size (checked
by tests/engine/test_multi_lora.py), so a request's tokens are the same alone or in any batch
(as the low-bit layers do, sorai.model.quant.linear). Measured on a 2-core AVX2 CPU, a decode
step's deltas over 1 to 16 adapters take 0.4-0.5x the time of the former per-row weight copies
with elementwise products (benchmarks/README.md); prompt chunks segment (bench_lora --kernels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sorai.model.fusion import FUSED_ATTRIBUTE, Fused
from sorai.model.lora import AdapterFile, LoRAError, linear_shapes
from sorai.model.transformer import Transformer

# A batch of rows of distinct slots reads the stacks' slots lo..hi as one view (rows of the
# slots in between no row uses are zero items) while at most this many times as many slots
# as rows; beyond, it copies the slots it uses.
PAD_MAX_RATIO = 2


@dataclass
class _Batch:
    """Gathered rows whose deltas one bmm per module computes, each row one item."""

    rows: slice | Tensor  # the rows of the step, in item order
    # The items' weights: slots lo..hi of the stacks (a view), one slot (shared by every
    # item, expanded), or each item's slot gathered (a copy).
    weights: slice | int | Tensor
    size: int  # items
    items: Tensor | None = None  # with zero items among them: each row's item


@dataclass
class StepRows:
    """Which adapter slot each row of a step's flat token row uses (built by plan())."""

    runs: list[tuple[int, int, int]]  # segmented rows: (slot, start, end), contiguous
    batches: list[_Batch] = field(default_factory=list)  # gathered rows


def slot_bytes(adapter: AdapterFile, shapes: dict[str, tuple[int, int]], max_rank: int) -> int:
    """Bytes an adapter's slot holds: float32 A and B of each module it adapts, its rank
    padded to max_rank (what a memory budget in bytes counts)."""
    return sum((shapes[name][0] + shapes[name][1]) * max_rank * 4 for name in adapter.modules)


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
        self.a: Tensor | None = None  # [slots, in, parts * max_rank]
        self.b: list[Tensor] = []  # per part [slots, max_rank, out]
        self.present: list[set[int]] = [set() for _ in self.names]  # slots per part

    def grow(self, capacity: int) -> None:
        """Hold `capacity` slots (the new ones zero); nothing before the first adapter."""
        o = self.owner
        if self.a is None:
            shape = (0, self.in_features, len(self.names) * o.max_rank)
            self.a = torch.zeros(shape, dtype=o.dtype, device=o.device)
            self.b = [
                torch.zeros(0, o.max_rank, size, dtype=o.dtype, device=o.device)
                for size in self.sizes
            ]
        more = capacity - self.a.shape[0]
        if more > 0:
            self.a = torch.cat([self.a, self.a.new_zeros(more, *self.a.shape[1:])])
            self.b = [torch.cat([b, b.new_zeros(more, *b.shape[1:])]) for b in self.b]

    def load(self, slot: int, adapter: AdapterFile) -> None:
        """Write the adapter's parts for this module into `slot` (zeros where it has none)."""
        r_max = self.owner.max_rank
        wanted = [name in adapter.modules for name in self.names]
        if self.a is None:
            if not any(wanted):
                return
            self.grow(self.owner.capacity)
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
                self.a[slot, :, p * r_max : p * r_max + r] = module.lora_A.t().to(self.a.dtype)
                scaled = module.lora_B.float() * adapter.scaling(name)
                self.b[p][slot, :r] = scaled.t().to(self.a.dtype)
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
        for batch in step.batches:
            self._gather(batch, x2, out2)
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
            h = torch.mm(xs, a[slot])  # [rows, parts * max_rank]
            r = self.owner.ranks[slot]
            for p in parts:
                col = self.starts[p]
                delta = torch.mm(h[:, p * r_max : p * r_max + r], self.b[p][slot, :r])
                out[start:end, col : col + self.sizes[p]] += delta.to(out.dtype)

    def _gather(self, batch: _Batch, x: Tensor, out: Tensor) -> None:
        # Always the full max_rank (zero-padded) and one row per item: a row's products and
        # sums are then the same whatever shares the step (see the module docstring).
        r, a = self.owner.max_rank, self.a
        assert a is not None
        xs = x[batch.rows].to(a.dtype)
        if batch.items is not None:
            padded = xs.new_zeros(batch.size, xs.shape[1])
            padded[batch.items] = xs
            xs = padded
        h = torch.bmm(xs[:, None, :], _select(a, batch))  # [items, 1, parts * r]
        for p, b in enumerate(self.b):
            if not self.present[p]:
                continue
            hp = h[:, :, p * r : (p + 1) * r].contiguous()
            delta = torch.bmm(hp, _select(b, batch))[:, 0]  # [items, out]
            if batch.items is not None:
                delta = delta[batch.items]
            cols = out[:, self.starts[p] : self.starts[p] + self.sizes[p]]
            if isinstance(batch.rows, slice):
                cols[batch.rows] += delta.to(out.dtype)
            else:
                cols.index_add_(0, batch.rows, delta.to(out.dtype))


def _select(stack: Tensor, batch: _Batch) -> Tensor:
    """The batch's items' weights from a stack [slots, ...]."""
    if isinstance(batch.weights, int):
        return stack[batch.weights].expand(batch.size, *stack.shape[1:])
    if isinstance(batch.weights, slice):
        return stack[batch.weights]
    return stack.index_select(0, batch.weights)


def _batches(rows: list[int], slots: list[int], device: torch.device) -> list[_Batch]:
    """The bmm batch of gathered rows (their step rows and slots, as they come): one, since
    the ops per batch cost more than copying weights (measured: 16 rows over 4 adapters in
    one batch of copies took 0.64x the time of 4 batches of one adapter's weights expanded).

    Rows all of one slot share its weights (expanded); rows of distinct slots read a view of
    the stacks where they can (_distinct); other mixes gather a copy of each row's slot.
    """
    if len(set(slots)) == 1:
        return [_Batch(_rows(rows, device), slots[0], len(rows))]
    if len(set(slots)) == len(slots):
        return [_distinct(rows, slots, device)]
    weights = torch.tensor(slots, dtype=torch.long, device=device)
    return [_Batch(_rows(rows, device), weights, len(slots))]


def _distinct(rows: list[int], slots: list[int], device: torch.device) -> _Batch:
    """One batch of rows of distinct slots."""
    order = sorted(range(len(slots)), key=slots.__getitem__)
    rows = [rows[i] for i in order]
    slots = [slots[i] for i in order]
    lo, span = slots[0], slots[-1] - slots[0] + 1
    if span == len(slots):
        return _Batch(_rows(rows, device), slice(lo, lo + span), span)
    if span <= PAD_MAX_RATIO * len(slots):
        items = torch.tensor([s - lo for s in slots], dtype=torch.long, device=device)
        return _Batch(_rows(rows, device), slice(lo, lo + span), span, items)
    weights = torch.tensor(slots, dtype=torch.long, device=device)
    return _Batch(_rows(rows, device), weights, len(slots))


def _rows(rows: list[int], device: torch.device) -> slice | Tensor:
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


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
        self.capacity = 0  # slots the stacks hold: up to the highest loaded so far
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
        if not 0 <= slot < self.max_loras:
            raise LoRAError(f"slot {slot} is not one of this model's {self.max_loras} slots")
        if slot >= self.capacity:
            self.capacity = slot + 1
            for target in self.targets:
                if target.a is not None:
                    target.grow(self.capacity)
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
        if not runs and not slots:
            return None
        step = StepRows(runs)
        if slots:
            step.batches = _batches(index, slots, self.model.device)
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
