"""Cross-entropy over the vocabulary without holding every position's logits at once.

A plain loop computes [tokens, vocab] float32 logits for the whole micro-batch, then their
log-softmax and its gradient: for the default model at 8 x 256 tokens that is three 400 MB
tensors, most of a plain loop's peak memory. Here the head is applied to a chunk of positions at
a time and the gradient of each chunk (softmax - one_hot) is pushed through the head at once, so
at most one chunk's logits exist. Only positions with a target are projected at all: prompt
tokens under loss masking and padding cost nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sorai.train.data import IGNORE_INDEX

DEFAULT_CHUNK = 1024


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of -log softmax(hidden @ weight.T)[target]; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = softmax - one_hot(target), built in the logits' own memory.
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            g = probs.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = g @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.t().float(), h.float())
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
        )
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_out.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (grad_weight * grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """Summed next-token cross-entropy of `hidden` ([..., d], the final norm's output) under the
    head `weight` ([vocab, d]) against `labels` ([...], IGNORE_INDEX where there is no target).

    Returns the sum, not the mean, so the caller divides by the number of targets of the whole
    optimizer step (across gradient accumulation and data-parallel ranks): every target then
    weighs the same whatever micro-batch it falls in.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() == 0:
        # Still connected to the graph through the head too, so every parameter gets a (zero)
        # gradient: a rank whose rows are all padding (a ragged epoch end) must run the same
        # gradient collectives as the others, or FSDP's reduce-scatters go out of step.
        return (hidden.sum() + weight.sum()) * 0.0
    rows = hidden.index_select(0, keep)
    targets = labels.index_select(0, keep)
    if weight.dtype != rows.dtype:
        # Under autocast the head runs in the activations' dtype, as a Linear would.
        weight = weight.to(rows.dtype)
    return _ChunkedLinearCrossEntropy.apply(rows, weight, targets, chunk)
