"""The sampler: batched logits processing and token picking over logits [B, V].

One SequenceState (and so one SamplingParams) per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from sorai.engine.params import SamplingParams
from sorai.errors import SamplingError

__all__ = ["SequenceState", "process_logits", "sample"]


class SequenceState:
    """Per-sequence sampling bookkeeping, updated with each new token via append().

    Penalties need "which tokens were seen" and "how often was each generated"; rather than
    re-counting the whole history every step, the state keeps fixed-size [V] tensors on the
    logits' device and bumps one entry per new token (O(1) per step, no host round trip).
    Each tensor exists only when the params need it, so plain requests carry nothing:
      - seen:   bool [V], prompt + generated tokens (repetition_penalty != 1)
      - counts: float32 [V], generated tokens only (presence/frequency penalty != 0)
    It also owns the request's torch.Generator (when seeded), so its random stream continues
    across steps and does not depend on which other requests share the batch.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int] | Tensor,
        vocab_size: int,
        *,
        eos_token_ids: Iterable[int] = (),
        device: torch.device | str | None = None,
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        if device is None:
            device = prompt_ids.device if isinstance(prompt_ids, Tensor) else "cpu"
        self.device = torch.device(device)
        self.num_generated = 0
        eos = () if params.ignore_eos else tuple(eos_token_ids)
        # Token ids that end the sequence (checked by the caller after each step).
        self.stop_token_ids: frozenset[int] = frozenset(params.stop_token_ids) | frozenset(eos)

        self.seen: Tensor | None = None
        if params.repetition_penalty != 1.0:
            ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).to(self.device)
            # Ids past the logits' width cannot be generated, so they need no penalty (as in HF).
            ids = ids[(ids >= 0) & (ids < vocab_size)]
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            self.seen[ids] = True

        self.counts: Tensor | None = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)

        # Ids banned until min_tokens have been generated: the stop ids and EOS (unless ignored).
        self._min_tokens_ids: Tensor | None = None
        banned = sorted(i for i in self.stop_token_ids if i < vocab_size)
        if params.min_tokens > 0 and banned:
            self._min_tokens_ids = torch.tensor(banned, dtype=torch.long, device=self.device)

        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(params.seed)

    def append(self, token_id: int | Tensor) -> None:
        """Record one generated token; a 0-d/1-element device tensor avoids a host sync."""
        self.num_generated += 1
        if self.seen is None and self.counts is None:
            return
        if isinstance(token_id, Tensor):
            index = token_id.reshape(1).to(device=self.device, dtype=torch.long)
            if self.seen is not None:
                self.seen.index_fill_(0, index, True)
            if self.counts is not None:
                self.counts.index_add_(0, index, torch.ones(1, device=self.device))
        else:
            if self.seen is not None:
                self.seen[token_id] = True
            if self.counts is not None:
                self.counts[token_id] += 1

    @property
    def min_tokens_pending(self) -> bool:
        """True while stop ids must still be masked to honour min_tokens."""
        return self._min_tokens_ids is not None and self.num_generated < self.params.min_tokens


def _row_values(values: list[float], device: torch.device) -> float | Tensor:
    # One row: a Python scalar broadcasts for free; several rows: a [n, 1] column.
    if len(values) == 1:
        return values[0]
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _on_rows(logits: Tensor, rows: list[int], fn: Callable[[Tensor, list[int]], Tensor]) -> Tensor:
    """Apply fn(sub_logits, rows) -> new sub_logits only to `rows`, skipping the gather if all."""
    if len(rows) == logits.shape[0]:
        return fn(logits, rows)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits.index_copy_(0, index, fn(logits.index_select(0, index), rows))
    return logits


def process_logits(logits: Tensor, states: Sequence[SequenceState]) -> Tensor:
    """Apply penalties, min_tokens, temperature, top_k, top_p and min_p to logits [B, V].

    Returns new float32 logits (the input is left untouched), or float32 input itself where
    no stage applies to any row; masked tokens are -inf. Row i
    uses states[i]. Greedy rows get penalties and min_tokens only, since the warpers never
    change the argmax. Each stage runs only on the rows that need it, and not at all when
    none do, so the common B=1 request pays only for what it asked for.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(
            f"logits must be [B, V] with B == len(states) ({len(states)}), "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.dtype == torch.float32 and not any(map(_changes_logits, states)):
        # Plain greedy rows (and sampling at temperature 1 with no filter): nothing to change,
        # so no copy of the whole [B, V] block on every decode step.
        return logits
    device = logits.device
    # One copy up front: every later stage may then work in place.
    logits = logits.to(torch.float32, copy=True)
    params = [s.params for s in states]

    for i, p in enumerate(params):
        if p.logit_bias:
            ids, values = zip(*p.logit_bias, strict=True)
            index = torch.tensor(ids, dtype=torch.long, device=device)
            if int(index.max()) >= logits.shape[1]:
                raise SamplingError(
                    f"logit_bias names token {int(index.max())}, past the vocabulary "
                    f"({logits.shape[1]} tokens)"
                )
            logits[i].index_add_(0, index, torch.tensor(values, device=device))

    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rows:

        def repetition(x: Tensor, rows: list[int]) -> Tensor:
            penalty = _row_values([params[i].repetition_penalty for i in rows], device)
            seen = states[rows[0]].seen[None] if len(rows) == 1 else _stack(states, rows, "seen")
            return torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)

        logits = _on_rows(logits, rows, repetition)

    rows = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    if rows:

        def presence_frequency(x: Tensor, rows: list[int]) -> Tensor:
            counts = (
                states[rows[0]].counts[None] if len(rows) == 1 else _stack(states, rows, "counts")
            )
            freq = _row_values([params[i].frequency_penalty for i in rows], device)
            pres = _row_values([params[i].presence_penalty for i in rows], device)
            return x.sub_(counts * freq).sub_((counts > 0).float() * pres)

        logits = _on_rows(logits, rows, presence_frequency)

    for i, state in enumerate(states):
        if state.min_tokens_pending:
            logits[i].index_fill_(0, state._min_tokens_ids, float("-inf"))

    sampled = [i for i, p in enumerate(params) if not p.greedy]
    rows = [i for i in sampled if params[i].temperature != 1.0]
    if rows:
        logits = _on_rows(
            logits,
            rows,
            lambda x, rows: x.div_(_row_values([params[i].temperature for i in rows], device)),
        )

    rows = [i for i in sampled if params[i].top_k or params[i].top_p < 1.0]
    if rows:
        logits = _on_rows(logits, rows, lambda x, rows: _top_k_top_p(x, [params[i] for i in rows]))

    rows = [i for i in sampled if params[i].min_p > 0.0]
    if rows:

        def min_p(x: Tensor, rows: list[int]) -> Tensor:
            # p / p_max < min_p  <=>  logit - max_logit < log(min_p): no softmax needed.
            log_min_p = _row_values([math.log(params[i].min_p) for i in rows], device)
            threshold = x.amax(dim=-1, keepdim=True) + log_min_p
            return x.masked_fill_(x < threshold, float("-inf"))

        logits = _on_rows(logits, rows, min_p)

    return logits


def _changes_logits(state: SequenceState) -> bool:
    """Whether any stage of process_logits applies to this row."""
    p = state.params
    if p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        return True
    if state.min_tokens_pending:
        return True
    return not p.greedy and (
        p.temperature != 1.0 or bool(p.top_k) or p.top_p < 1.0 or p.min_p > 0.0
    )


def _stack(states: Sequence[SequenceState], rows: list[int], name: str) -> Tensor:
    return torch.stack([getattr(states[i], name) for i in rows])


def _top_k_top_p(x: Tensor, params: list[SamplingParams]) -> Tensor:
    """Mask x [n, V] to each row's top_k, then top_p of what is left (HF semantics, ties kept)."""
    vocab = x.shape[-1]
    ks = [min(p.top_k, vocab) if p.top_k else vocab for p in params]
    if all(p.top_p >= 1.0 for p in params):
        # top_k only: a partial topk is much cheaper than a full sort of the vocabulary.
        values = torch.topk(x, max(ks), dim=-1).values
        if len(ks) == 1:
            pivot = values[:, -1:]
        else:
            index = torch.tensor(ks, dtype=torch.long, device=x.device).sub_(1).unsqueeze(1)
            pivot = values.gather(1, index)
        return x.masked_fill_(x < pivot, float("-inf"))

    # One ascending sort serves both: the k-th largest is at V - k, and tokens top_k removes
    # sort below the pivot, so masking them to -inf keeps the order valid for the cumsum.
    sorted_x, order = torch.sort(x, dim=-1)
    if any(p.top_k for p in params):
        index = torch.tensor([vocab - k for k in ks], dtype=torch.long, device=x.device)
        pivot = sorted_x.gather(1, index.unsqueeze(1))
        sorted_x.masked_fill_(sorted_x < pivot, float("-inf"))
    cumulative = sorted_x.softmax(dim=-1).cumsum_(dim=-1)
    # Rows without top_p get threshold -1 so they lose nothing (1 - 1.0 = 0 would drop
    # zero-probability tokens, harmless but not an identity).
    threshold = _row_values([1.0 - p.top_p if p.top_p < 1.0 else -1.0 for p in params], x.device)
    remove = cumulative <= threshold
    remove[:, -1] = False  # always keep the most likely token
    sorted_x.masked_fill_(remove, float("-inf"))
    return x.scatter_(1, order, sorted_x)


def sample(logits: Tensor, states: Sequence[SequenceState]) -> Tensor:
    """Pick the next token id per row from process_logits() output; returns int64 [B] on device.

    Greedy rows take argmax (first index on ties, as torch.argmax in HF greedy search). Sampled
    rows use the exponential race argmax(p / E), E ~ Exponential(1), which draws exactly from p
    without torch.multinomial's host sync; E comes from the row's seeded generator when it has
    one, so a seed fixes the tokens.
    """
    greedy = [s.params.greedy for s in states]
    if all(greedy):
        return logits.argmax(dim=-1)
    rows = [i for i, g in enumerate(greedy) if not g]
    x = logits if len(rows) == len(states) else logits[rows]
    probs = torch.softmax(x.float(), dim=-1)
    race = torch.empty_like(probs)
    if any(states[i].generator is None for i in rows):
        race.exponential_()  # unseeded rows share the global RNG
    for j, i in enumerate(rows):
        if states[i].generator is not None:
            race[j].exponential_(generator=states[i].generator)
    # exponential_ can return exactly 0; 0/0 would be NaN, which argmax treats as the maximum.
    race.clamp_min_(torch.finfo(torch.float32).tiny)
    drawn = probs.div_(race).argmax(dim=-1)
    if len(rows) == len(states):
        return drawn
    tokens = logits.argmax(dim=-1)
    tokens[rows] = drawn
    return tokens
