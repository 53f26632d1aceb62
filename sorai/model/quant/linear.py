"""int4 (group-wise, asymmetric) and int8 (per output channel) linear layers.

Small batches (decoding) run PyTorch's weight-only low-bit kernels, which read 4 or 8 bits per
weight instead of 32: `_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm`, both fast with
bfloat16 activations (with float32 ones they fall back to a slow reference loop), so the layer
casts its input to bfloat16 and its output back. Large batches (prompt chunks) are compute-
bound, where these kernels lose to the dense GEMM (measured on a 2-core AVX2 CPU at 512 rows:
int4 36 ms, int8 30 ms, float32 14 ms for a 576x1536 layer): from `dense_from_rows` rows on, the
layer expands the weight the kernel would use (about 1 ms) and runs a float32 GEMM on the same
bfloat16-rounded inputs, rounding the output to bfloat16 as the kernel does. Both paths thus
compute the same products and differ only in summation order.

Which path a row takes depends on what the row's token is, never on how many rows share the
batch: the engine marks its step's generated tokens (`kernel_rows_of`), which run the kernel,
while prompt tokens run the dense GEMM, so a request's tokens take the same path alone or among
fifteen others. (A prompt computed in pieces, after a prefix-cache hit or in chunks, still sums
in another order inside the GEMM and attention kernels, whose tiling follows the row count: a
near-tie can then go the other way, as in vLLM without its batch-invariant mode.) Without a
mark, an input [..., 1, in] (one new token per sequence: decoding) runs the kernel, a longer one
the GEMM, and a plain matrix follows the row count.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sorai.model.hardware import cpu_count
from sorai.model.quant import fp16_gemm

# Rows at and above which a plain matrix input runs the dense GEMM (see the module docstring).
DENSE_FROM_ROWS = 48
# Weight rows dequantized and packed at a time for the float16 path (an 18 MB float32 slice
# of the default model's 49152 x 576 head, not all 113 MB).
FP16_PACK_ROWS = 8192
# (rows, mask): the step's row count and which rows run the kernel, one bool for all alike.
_KERNEL_ROWS: ContextVar[tuple[int, Tensor | bool] | None] = ContextVar(
    "sorai_kernel_rows", default=None
)


@contextlib.contextmanager
def kernel_rows_of(generated: Sequence[bool]) -> Iterator[None]:
    """Within the block, the rows of a step's flat token row whose token is a generated one
    run the low-bit kernel, the prompt tokens' rows the dense GEMM (the module docstring)."""
    # Settled once per step: every low-bit layer asks (over a hundred per decode step), and
    # a tensor's all()/any() is two ops and two host reads each time.
    kernel = all(generated)
    mask = kernel if kernel or not any(generated) else torch.tensor(generated, dtype=torch.bool)
    token = _KERNEL_ROWS.set((len(generated), mask))
    try:
        yield
    finally:
        _KERNEL_ROWS.reset(token)


def kernel_mask(x: Tensor, dense_from_rows: int, marks: bool = True) -> Tensor | bool:
    """Which rows of `x` run the low-bit kernel: a bool per row, or one bool for all."""
    if x.device.type != "cpu":
        return False
    rows = x.numel() // x.shape[-1]
    marked = _KERNEL_ROWS.get() if marks else None
    if marked is not None and marked[0] == rows:
        return marked[1]
    if x.dim() >= 3:
        return x.shape[-2] == 1
    return rows < dense_from_rows


# Rows from which a kernel call runs on every core the process may use, where a server opts in
# (sorai.model.quant.decode_path, "all-cores"). The int4/int8 kernels split a call's output
# columns between threads, never a dot product, so their numbers do not depend on the thread
# count (tests/model/test_decode_path.py checks it): switching by row count keeps a row's result
# independent of its batch. On 2 quiet cores limited to AVX2, 30 blocks' int4 matmuls for 16
# sequences took 93.9 ms on one thread and 73.8 on two; on 2 cores shared with other work,
# 10-30x longer than on one thread with libgomp's idle threads spinning (they take the time
# slices the working thread needs; `import sorai` makes them sleep), which is why the engine
# decodes on one core less than it has and this is not the default.
ALL_CORES_FROM_ROWS = 4


def on_all_cores(kernel: Callable[[Tensor], Tensor], rows: Tensor, from_rows: int | None) -> Tensor:
    """kernel(rows), on every core where `from_rows` is set and rows reach it."""
    if from_rows is None or rows.shape[0] < from_rows:
        return kernel(rows)  # the default, asked per kernel call: no system call on the way
    threads, cores = torch.get_num_threads(), cpu_count()
    if threads >= cores:
        return kernel(rows)
    torch.set_num_threads(cores)
    try:
        return kernel(rows)
    finally:
        torch.set_num_threads(threads)


def by_rows(rows: Tensor, mask: Tensor | bool, kernel, dense) -> Tensor:
    """kernel(rows) where mask, dense(rows) elsewhere, each on its own rows only."""
    if isinstance(mask, bool):
        return kernel(rows) if mask else dense(rows)
    out_k, out_d = kernel(rows[mask]), dense(rows[~mask])
    out = out_k.new_empty(rows.shape[0], out_k.shape[1])
    out[mask], out[~mask] = out_k, out_d
    return out


# The CPU int4 packing interleaves rows in blocks (32 or 64 by instruction set); layers joined
# by concat must each hold whole blocks.
INT4_ROW_BLOCK = 64
# What the kernels take (measured on torch 2.13): the int4 packing refuses other row counts, the
# int8 kernel crashes the process on other input widths.
INT4_OUT_MULTIPLE = 16
INT8_IN_MULTIPLE = 8


class LowBitLinear(nn.Module):
    """Shared plumbing: shapes, bias, the dense fallback for large batches."""

    weight_format = "low-bit"
    dense_from_rows = DENSE_FROM_ROWS
    # Set per server by sorai.model.quant.decode_path ("dense"): every row, decoding included,
    # runs the dense GEMM on a float32 copy of the kernel's weight made on first use.
    dense_decode = False
    dense_cache: Tensor | None = None
    # Set per server likewise ("all-cores"): kernel calls of this many rows run on every core.
    all_cores_from_rows: int | None = None
    # Set per server likewise ("fp16"): every row, prompt or generated, runs fbgemm's float16
    # GEMM (sorai.model.quant.fp16_gemm) on a float16 copy of the weight, packed by the server
    # for the layers that run (fused ones, not their parts), or else on first use.
    fp16_decode = False
    fp16_weight: list[tuple[Any, int]] | None = None  # (pack, rows) per slice of rows

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [out, in] the layer stands for (exact, for merging and saving)."""
        raise NotImplementedError

    def kernel_weight(self) -> Tensor:
        """The float32 weight the low-bit kernel multiplies by (its scales are bfloat16)."""
        raise NotImplementedError

    def _lowbit(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _kernel(self, rows: Tensor) -> Tensor:
        return on_all_cores(self._lowbit, rows, self.all_cores_from_rows)

    def forward(self, x: Tensor) -> Tensor:
        if self.fp16_decode:
            out = self._fp16(x.reshape(-1, self.in_features).to(torch.float32)).to(x.dtype)
        else:
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            mask = False if self.dense_decode else kernel_mask(x, self.dense_from_rows)
            out = by_rows(rows, mask, self._kernel, self._dense).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def pack_fp16(self) -> bool:
        """Make the float16 copy, FP16_PACK_ROWS rows at a time, unless made already (then
        False): a large table (the head) never has its whole float32 weight in memory at once."""
        if self.fp16_weight is not None:
            return False
        pieces = [
            (fp16_gemm.pack(rows), rows.shape[0])
            for rows in self.dequantized_slices(FP16_PACK_ROWS)
        ]
        self.fp16_weight = pieces
        return True

    def dequantized_slices(self, rows: int) -> Iterator[Tensor]:
        """dequantize() `rows` rows at a time (from one dequantization here; layers that can
        dequantize a slice alone do so)."""
        yield from self.dequantize().split(rows)

    def _fp16(self, rows: Tensor) -> Tensor:
        self.pack_fp16()
        assert self.fp16_weight is not None
        rows = rows.contiguous()
        if len(self.fp16_weight) == 1:
            return fp16_gemm.linear(rows, *self.fp16_weight[0])
        return torch.cat([fp16_gemm.linear(rows, *piece) for piece in self.fp16_weight], dim=1)

    def _dense(self, rows: Tensor) -> Tensor:
        weight = self.dense_cache
        if weight is None and self.dense_decode:
            # Column-major, as the loader lays float32 weights (MKL streams it faster).
            weight = self.dense_cache = self.kernel_weight().t().contiguous().t()
        if weight is None:
            weight = self.kernel_weight()
        return F.linear(rows.to(torch.float32), weight).to(torch.bfloat16)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(LowBitLinear):
    """w = q * scale + minimum per group of `group_size` inputs, q in 0..15.

    Exactly the layout of GGUF's Q4_1 (and of Q4_0 with minimum = -8 * scale), so those
    blocks load as they are. Holds the kernel's packed weight plus the plain nibbles
    (two per byte, even input index in the low half) for dequantizing.
    """

    def __init__(
        self,
        q: Tensor,  # uint8 [out, in], values 0..15
        scale: Tensor,  # float [out, in / group_size]
        minimum: Tensor,  # float [out, in / group_size]
        bias: Tensor | None = None,
    ) -> None:
        out_features, in_features = q.shape
        if not int4_fits(out_features, in_features, in_features // scale.shape[1]):
            raise ValueError(
                f"a {out_features}x{in_features} weight does not fit the int4 kernel "
                f"(rows a multiple of {INT4_OUT_MULTIPLE}, columns of the group size)"
            )
        super().__init__(in_features, out_features, bias)
        self.group_size = in_features // scale.shape[1]
        self.weight_format = f"int4 (group {self.group_size})"
        q = q.to(torch.uint8)
        if packed_row_block(out_features) is None:
            # Codes only the kernel's packing holds are read back from it (codes()); a build
            # whose packing is not known keeps its own copy.
            self.register_buffer("nibbles", q[:, 0::2] | (q[:, 1::2] << 4))
        # float16 where that is exact (GGUF's Q4_0/Q4_1 scales, and quantize()'s): half the bytes.
        self.register_buffer("scale", _compact(scale))
        self.register_buffer("minimum", _compact(minimum))
        # The kernel computes (q - 8) * scale + zero.
        zero = minimum.float() + 8 * scale.float()
        scales_zeros = torch.stack((scale.float(), zero), dim=-1).transpose(0, 1)
        self.register_buffer("scales_zeros", scales_zeros.contiguous().to(torch.bfloat16))
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        )

    @classmethod
    def quantize(
        cls, weight: Tensor, group_size: int = 32, bias: Tensor | None = None
    ) -> Int4Linear:
        """Round a float weight to the nearest int4 per group (min/max, asymmetric)."""
        out_features, in_features = weight.shape
        if not int4_fits(out_features, in_features, group_size):
            raise ValueError(
                f"a {out_features}x{in_features} weight does not fit the int4 kernel "
                f"(rows a multiple of {INT4_OUT_MULTIPLE}, columns of {group_size})"
            )
        groups = weight.detach().float().reshape(out_features, -1, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        # Scale and minimum are kept to float16 values, so the layer is exactly a GGUF Q4_1
        # tensor (sorai quantize writes it as one, bit for bit).
        scale, low = _fp16_scale((high - low) / 15), _fp16_values(low)
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
        return cls(q.reshape(out_features, in_features).to(torch.uint8), scale, low, bias)

    def codes(self) -> Tensor:
        """The 4-bit codes q, uint8 [out, in] (values 0..15)."""
        nibbles = self._buffers.get("nibbles")
        if nibbles is None:
            return unpack_int4(self.packed, self.out_features, self.in_features)
        return torch.stack((nibbles & 15, nibbles >> 4), dim=-1).view(self.out_features, -1)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        # Saved layers keep the portable form: nibbles, float32 scale and minimum.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "nibbles" not in self._buffers:
            q = self.codes()
            destination[prefix + "nibbles"] = q[:, 0::2] | (q[:, 1::2] << 4)
        for name in ("scale", "minimum"):
            destination[prefix + name] = destination[prefix + name].float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        groups = self.codes().view(self.out_features, -1, self.group_size).to(torch.float32)
        scale, minimum = self.scale.float(), self.minimum.float()
        weight = groups * scale[..., None] + minimum[..., None]
        return weight.view(self.out_features, self.in_features).to(dtype)

    def kernel_weight(self) -> Tensor:
        q = self.codes()
        groups = q.view(self.out_features, -1, self.group_size).to(torch.float32) - 8
        scale, zero = self.scales_zeros.to(torch.float32).transpose(0, 1).unbind(-1)
        weight = groups * scale[..., None] + zero[..., None]
        return weight.view(self.out_features, self.in_features)

    def _lowbit(self, rows: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.packed, self.group_size, self.scales_zeros.contiguous()
        )

    @classmethod
    def concat(cls, parts: Sequence[Int4Linear]) -> Int4Linear | None:
        """One layer computing the parts' outputs side by side; the parts become its views."""
        if len({p.group_size for p in parts}) != 1 or any(
            p.out_features % INT4_ROW_BLOCK or (p.bias is None) != (parts[0].bias is None)
            for p in parts
        ):
            return None
        joined = cls.__new__(cls)
        width = sum(p.out_features for p in parts)
        LowBitLinear.__init__(joined, parts[0].in_features, width, None)
        joined.group_size = parts[0].group_size
        joined.weight_format = parts[0].weight_format
        stored = [(name, 0) for name in ("nibbles",) if name in parts[0]._buffers]
        stored += [("scale", 0), ("minimum", 0), ("scales_zeros", 1), ("packed", 0)]
        for name, dim in stored:
            whole = torch.cat([getattr(p, name) for p in parts], dim=dim)
            joined.register_buffer(name, whole)
            start = 0
            for part in parts:
                end = start + part.out_features
                setattr(part, name, whole.narrow(dim, start, end - start))
                start = end
        if parts[0].bias is not None:
            joined.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        return joined


class Int8Linear(LowBitLinear):
    """w = q * scale per output row, q in -127..127."""

    weight_format = "int8"

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        out_features, in_features = q.shape
        if in_features % INT8_IN_MULTIPLE:
            # The kernel reads past the row's end otherwise (a segfault, not an error).
            raise ValueError(
                f"in_features {in_features} is not a multiple of {INT8_IN_MULTIPLE}, "
                "which the int8 kernel needs"
            )
        super().__init__(in_features, out_features, bias)
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("scale_bf16", self.scale.to(torch.bfloat16))

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        q, scale = quantize_rows_int8(weight)
        return cls(q, scale, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def dequantized_slices(self, rows: int) -> Iterator[Tensor]:
        for start in range(0, self.out_features, rows):
            end = min(start + rows, self.out_features)
            yield self.q[start:end].to(torch.float32) * self.scale[start:end, None]

    def kernel_weight(self) -> Tensor:
        return self.q.to(torch.float32) * self.scale_bf16.to(torch.float32)[:, None]

    def _lowbit(self, rows: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(rows, self.q, self.scale_bf16)

    @classmethod
    def concat(cls, parts: Sequence[Int8Linear]) -> Int8Linear | None:
        if any((p.bias is None) != (parts[0].bias is None) for p in parts):
            return None
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        joined = cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), bias)
        start = 0
        for part in parts:
            end = start + part.out_features
            part.q, part.scale = joined.q[start:end], joined.scale[start:end]
            part.scale_bf16 = joined.scale_bf16[start:end]
            start = end
        return joined


def quantize_rows_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: (q int8 [out, in], scale float32 [out]).

    The scales are float16 values, so the rows are exactly a GGUF Q8_0 tensor whose blocks
    share their row's scale (what sorai quantize writes).
    """
    weight = weight.detach().float()
    scale = _fp16_scale(weight.abs().amax(dim=1) / 127)
    q = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


# The smallest positive float16 (a subnormal): the least scale a block can hold.
_FP16_TINY = 2.0**-24


def _fp16_values(t: Tensor) -> Tensor:
    """t rounded to the nearest float16 value, kept float32."""
    return t.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)


def _fp16_scale(t: Tensor) -> Tensor:
    """A scale (>= 0) rounded to float16, at least _FP16_TINY so that dividing by it is safe."""
    return _fp16_values(t).clamp(min=_FP16_TINY)


def _compact(t: Tensor) -> Tensor:
    """t as float16 where every value is one, else float32."""
    t = t.float().contiguous()
    half = t.to(torch.float16)
    return half if torch.equal(half.float(), t) else t


def unpack_int4(packed: Tensor, out_features: int, in_features: int) -> Tensor:
    """The codes uint8 [out, in] that _convert_weight_to_int4pack_for_cpu packed.

    The packing (this torch build, this CPU's kernels) cuts the rows in blocks of B (32 on
    AVX2, 64 on AVX-512) and stores each block as [in, B/2] bytes whose low nibble is row j,
    high nibble row j + B/2; packed_row_block() checks B on this machine once.
    """
    block = packed_row_block(out_features)
    if block is None:
        raise ValueError(f"no known int4 packing for {out_features} rows on this machine")
    return _unpack(packed, out_features, in_features, block)


def _unpack(packed: Tensor, out_features: int, in_features: int, block: int) -> Tensor:
    # Transposing the bytes first moves half as much memory as transposing the codes.
    rows = packed.reshape(out_features // block, in_features, block // 2).transpose(1, 2)
    rows = rows.contiguous()  # [blocks, B/2, in]
    return torch.cat((rows & 15, rows >> 4), dim=1).view(out_features, in_features)


def packed_row_block(out_features: int) -> int | None:
    """The row block of the CPU int4 packing when it is known and divides `out_features`."""
    block = _packing_block()
    return block if block is not None and out_features % block == 0 else None


@functools.cache
def _packing_block() -> int | None:
    """B for unpack_int4 on this machine, found by packing random codes and reading them back;
    None when neither known layout reads them back (then layers keep their own codes)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 64), generator=generator, dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:
        return None
    if packed.numel() * 2 != q.numel():
        return None
    for block in (32, 64):
        if torch.equal(_unpack(packed, 128, 64, block).to(torch.int32), q):
            return block
    return None


def int4_fits(out_features: int, in_features: int, group_size: int = 32) -> bool:
    """Whether the int4 kernel takes a weight of this shape."""
    return out_features % INT4_OUT_MULTIPLE == 0 and in_features % group_size == 0


def int8_fits(in_features: int) -> bool:
    """Whether the int8 kernel takes inputs this wide."""
    return in_features % INT8_IN_MULTIPLE == 0
