"""Perplexity of a text under a model: how the quality of a weight format is measured.

Scored with a sliding window, as is usual for a model whose context is shorter than the text:
each window holds up to `window` tokens, and only the tokens that earlier windows did not score
count (the first window scores all of its own), so every token after the first is scored once,
with at least `window - stride` tokens of context where the text allows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sorai.errors import SoraiError
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer


def perplexity(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    window: int = 512,
    stride: int = 256,
) -> float:
    """exp(mean negative log-likelihood) of `text`'s tokens after the first."""
    if not 0 < stride <= window:
        raise SoraiError(f"stride {stride} must be in 1..window ({window})")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise SoraiError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    total = 0.0
    scored_to, end = 1, min(window, len(ids))  # token 0 is never predicted
    with torch.inference_mode():
        while True:
            start = max(0, end - window)
            chunk = torch.tensor([ids[start:end]], device=model.device)
            logits = model(chunk)[0].float()  # row i predicts token start + i + 1
            targets = chunk[0, scored_to - start :]
            rows = logits[scored_to - start - 1 : end - start - 1]
            total += F.cross_entropy(rows, targets, reduction="sum").item()
            scored_to = end
            if end == len(ids):
                return math.exp(total / (len(ids) - 1))
            end = min(end + stride, len(ids))
