"""What the engine hands back: per-step deltas of each request's choices, and engine stats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the `k` most likely alternatives (best first).

    Log-probabilities are of the model's own distribution (log_softmax of the raw logits),
    before penalties, temperature or truncation, as vLLM reports them.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ChoiceDelta:
    """What one choice (of a request's `n`) produced since the previous output."""

    index: int
    text: str  # new text; stop strings and held-back partial matches are never in it
    token_ids: list[int]  # new tokens (a stop token that ended the choice is not included)
    logprobs: list[TokenLogprob] | None = None  # one per new token, when requested
    # "stop", "length", "abort" or "error" (guided decoding failed: see `error`) on the
    # choice's last delta.
    finish_reason: str | None = None
    # The stop string or stop token id that matched, or "budget": a guided output closed early
    # (its shortest valid completion taken) so that it ends complete within max_tokens.
    stop_reason: str | int | None = None
    error: str | None = None  # why the choice ended in error, for the caller to raise


@dataclass
class RequestOutput:
    """One step's news for one request: only choices that changed are listed."""

    request_id: str
    choices: list[ChoiceDelta]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    finished: bool  # every choice has finished


@dataclass
class EngineStats:
    """A snapshot for /metrics; counters are totals since start."""

    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    preemptions: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (cache hits excluded)
    generation_tokens: int = 0
    steps: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0
