"""The token table in int8 per row: embedding lookups, and the output head on the same tensor.

The head is the largest matmul of a small model (49152 x 576 for the default one: a third of
its weights), read once per decoding step; int8 holds it in a quarter of float32's bytes. A tied
model keeps one table: Int8Embedding owns it and Int8Head.tied_to shares its tensors.

The int8 kernel rounds its output to bfloat16, and near-equal top logits then tie (on the
default model, the first answer token of "What is the capital of France?" tied at 25.25). So
with float32 activations the head recomputes each row's EXACT_TOP highest logits in float32
(the float32 input times the int8 rows), which decides greedy picks and top probabilities as a
float head would, at the cost of one top-k and a few hundred multiply-adds per row. The same
recomputation runs for every batch size, so a row's top logits do not depend on its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sorai.model.quant.linear import Int8Linear, by_rows, kernel_mask, quantize_rows_int8

# Logits per row recomputed in float32 after the kernel's bfloat16 pass.
EXACT_TOP = 8
# Table rows dequantized at a time when a large batch runs the dense GEMM (bounds the
# temporary float32 copy to ~18 MB for 576 columns).
DENSE_CHUNK_ROWS = 8192


class Int8Embedding(nn.Module):
    """Rows of w = q * scale (q int8, one float32 scale per row), returned in the model's dtype."""

    weight_format = "int8 (embedding)"

    def __init__(self, q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("scale_bf16", self.scale.to(torch.bfloat16))
        # Carries the output dtype through model.to(dtype), as a float weight would.
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype))

    @classmethod
    def quantize(cls, weight: Tensor, dtype: torch.dtype | None = None) -> Int8Embedding:
        q, scale = quantize_rows_int8(weight)
        return cls(q, scale, dtype or weight.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.q).to(torch.float32) * self.scale[ids][..., None]
        return rows.to(self.dtype_probe.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int8Head(Int8Linear):
    """The output head in int8, its top logits per row recomputed in float32 (module docstring)."""

    weight_format = "int8 (head)"
    exact_top = EXACT_TOP

    @classmethod
    def tied_to(cls, embedding: Int8Embedding) -> Int8Head:
        """A head over the embedding's own tensors (no copy): the model's tie stays one table."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features, head.out_features = embedding.embedding_dim, embedding.num_embeddings
        head.bias = None
        for name in ("q", "scale", "scale_bf16"):
            head.register_buffer(name, getattr(embedding, name))
        return head

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.fp16_decode:
            return self._finish(x, rows, self._fp16(rows.to(torch.float32)))
        # By its row count, never by x's shape: the engine hands the head [1, S, hidden], the
        # S rows it samples, and treating that as a prompt sent every batch of two or more
        # through the dense GEMM (a float32 copy of the table expanded every step: at 16
        # rows ~2.5x the kernel's time, and a row's logits then depended on its batch). The
        # engine's marks name rows of the whole step, not these.
        mask = kernel_mask(rows, self.dense_from_rows, marks=False)
        logits = by_rows(
            rows.to(torch.bfloat16),
            mask,
            self._kernel,
            lambda r: self._dense_chunks(r.to(torch.float32)),
        )
        return self._finish(x, rows, logits)

    def _finish(self, x: Tensor, rows: Tensor, logits: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16 and rows.shape[0] > 0:
            logits = self._exact_top(rows, logits.to(torch.float32))
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)
        return logits.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _dense_chunks(self, rows: Tensor) -> Tensor:
        """The kernel's products by a float32 GEMM, a slice of the table at a time."""
        out = rows.new_empty(rows.shape[0], self.out_features)
        scale = self.scale_bf16.to(torch.float32)
        for start in range(0, self.out_features, DENSE_CHUNK_ROWS):
            end = min(start + DENSE_CHUNK_ROWS, self.out_features)
            weight = self.q[start:end].to(torch.float32) * scale[start:end, None]
            out[:, start:end] = F.linear(rows, weight)
        return out.to(torch.bfloat16)

    def _exact_top(self, rows: Tensor, logits: Tensor) -> Tensor:
        top = logits.topk(min(self.exact_top, self.out_features), dim=-1).indices
        # A multiply and a sum over each row, not einsum: its batched matmul sums in an order
        # that follows the row count, so a row's top logits would depend on its batch.
        exact = (self.q[top].to(torch.float32) * rows.float()[:, None, :]).sum(-1)
        return logits.scatter_(-1, top, exact * self.scale[top])
