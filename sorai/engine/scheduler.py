"""Continuous batching: which sequences run in the next step, and for how many tokens.

Every step has a token budget (max_num_batched_tokens) shared by decodes (one token each) and
prefills (as many prompt tokens as fit: long prompts go in chunks over several steps).
Running sequences come first, oldest first; waiting ones join while budget, sequence slots
and KV blocks last. When blocks run out, the newest running sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later (its prefix
may well still be in the prefix cache by then).
Priorities (SamplingParams.priority, lower first) order all of this: interactive requests
run, join and wait ahead of batch jobs, batch jobs are preempted first, and a step that
computes an interactive prompt leaves batch jobs out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sorai.engine.block_manager import BlockPool, block_hashes
from sorai.engine.config import EngineConfig
from sorai.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


@dataclass
class SchedulerStats:
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        pool: BlockPool,
        block_size: int,
        admit: Callable[[Sequence], bool] | None = None,
    ) -> None:
        self.config = config
        # Whether a waiting sequence may join now (its LoRA adapter got a slot); one that may
        # not stays first in line.
        self.admit = admit
        self.pool = pool
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        """Queue `seq` behind every waiting sequence of its priority or a better one."""
        rank = _priority(seq)
        at = next((i for i, w in enumerate(self.waiting) if _priority(w) > rank), None)
        if at is None:
            self.waiting.append(seq)
        else:
            self.waiting.insert(at, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        # A prompt of the best priority in line runs without worse-priority sequences beside
        # it: a batch's decodes pause for that step, and an interactive request's first token
        # comes as fast as when the engine is otherwise idle.
        urgent = self._urgent_priority()
        if urgent is not None:
            out = self._schedule(urgent)
            if out.scheduled or out.preempted:
                return out
        return self._schedule(None)

    def _urgent_priority(self) -> int | None:
        """The priority of the best prompt waiting to be computed (running in chunks, or first
        in line with a free slot), when some sequence of a worse priority could share its
        steps; else None."""
        prefilling = [s for s in self.running if s.num_computed < s.num_prompt]
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            prefilling.append(self.waiting[0])
        if not prefilling:
            return None
        best = min(_priority(s) for s in prefilling)
        others = [*self.running, *self.waiting]
        return best if any(_priority(s) > best for s in others) else None

    def _schedule(self, worst: int | None) -> SchedulerOutput:
        """One step's sequences; worst: leave out those of a priority above it."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for seq in sorted(self.running, key=_priority):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if worst is not None and _priority(seq) > worst:
                break  # sorted: the rest are worse too
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._reserve(seq, n):
                victim = _victim(self.running)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            out.scheduled.append((seq, n))
            budget -= n

        # Joining while others were just preempted would only thrash.
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if worst is not None and _priority(seq) > worst:
                break
            if self.admit is not None and not self.admit(seq):
                break
            if seq.num_computed == 0 and not seq.blocks:
                self._find_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, n):
                # It stays first in line, holding nothing: a waiting sequence that kept its
                # cache hits could starve the running ones it waits for.
                self.free(seq)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        self.stats.prompt_tokens += sum(
            n for s, n in out.scheduled if s.num_computed < s.num_prompt
        )
        return out

    def _find_cached_prefix(self, seq: Sequence) -> None:
        if not self.config.enable_prefix_caching:
            return
        seq.hashes = block_hashes(
            seq.hash_tokens, self.block_size, extra=seq.request.cache_salt, start=seq.hashes
        )
        # At least one token must be computed to get logits, so the last token never comes
        # from the cache (a fully cached prompt recomputes its final block's last token).
        usable = (seq.num_tokens - 1) // self.block_size
        found = self.pool.lookup(seq.hashes[:usable])
        self.stats.prefix_cache_queries += seq.num_tokens
        self.stats.prefix_cache_hits += len(found) * self.block_size
        if found:
            self.pool.claim(found)
            seq.blocks = list(found)
            seq.num_registered = len(found)
            seq.num_computed = len(found) * self.block_size
        request = seq.request
        if not request.cache_checked:
            request.cached_tokens, request.cache_checked = seq.num_computed, True

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Blocks for `n` more tokens of `seq`, and names for the blocks they fill."""
        needed = -(-(seq.num_computed + n) // self.block_size) - len(seq.blocks)
        if needed > 0:
            blocks = self.pool.allocate(needed)
            if blocks is None:
                return False
            seq.blocks.extend(blocks)
        if self.config.enable_prefix_caching:
            full = (seq.num_computed + n) // self.block_size
            if full > seq.num_registered:
                seq.hashes = block_hashes(
                    seq.hash_tokens[: full * self.block_size],
                    self.block_size,
                    extra=seq.request.cache_salt,
                    start=seq.hashes,
                )
                for i in range(seq.num_registered, full):
                    self.pool.register(seq.blocks[i], seq.hashes[i])
                seq.num_registered = full
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        # First in line again, but only among its own priority.
        rank = _priority(seq)
        at = next((i for i, w in enumerate(self.waiting) if _priority(w) >= rank), None)
        if at is None:
            self.waiting.append(seq)
        else:
            self.waiting.insert(at, seq)
        self.stats.preemptions += 1

    def free(self, seq: Sequence) -> None:
        """Give back a sequence's blocks (their cached names stay, for reuse)."""
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.num_registered = 0

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free(seq)
        seq.status = Status.FINISHED

    def after_step(self, out: SchedulerOutput) -> None:
        """The forward ran: the scheduled tokens now have keys and values."""
        for seq, n in out.scheduled:
            seq.num_computed += n


def _priority(seq: Sequence) -> int:
    return seq.request.params.priority


def _victim(running: list[Sequence]) -> Sequence:
    """The newest running sequence of the worst priority."""
    worst = max(_priority(s) for s in running)
    return next(s for s in reversed(running) if _priority(s) == worst)
