"""Engine knobs: the KV-cache geometry and the scheduler's budgets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sorai.errors import SoraiError

# The KV cache's size when none is given is one whole context window, at most this much.
DEFAULT_KV_CACHE_GIB = 1.0
KV_CACHE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    # KV blocks to allocate; None sizes the cache from kv_cache_gib.
    num_blocks: int | None = None
    # The KV cache's memory; None: room for one sequence of the whole context window (the
    # model's, or max_model_len), at most DEFAULT_KV_CACHE_GIB (a fixed 1 GiB took the default
    # model's server from ~0.5 to ~1.6 GB, where its 8192-token context needs 360 MiB). Its
    # pages are committed as blocks are first written, and written blocks are reused first
    # (prefix_cache_keep_tokens), so RSS grows with the traffic's working set up to this much.
    kv_cache_gib: float | None = None
    # How keys and values are stored ("auto" or a KV_CACHE_DTYPES name); attention reads them
    # back in the model's dtype. auto: the model's dtype. float16 (llama.cpp's default) halves a
    # float32 model's cache at the same perplexity (+-0.1% on the held-out texts) and decode
    # speed, but moves near-tie greedy picks: with the int4 decode kernels 3 of the tests' 12
    # prompts answered differently, "What is the capital of France?" no longer with Paris (a
    # 0.057 logit margin), with the float16 decode path none (benchmarks/bench_kv_cache_dtype.py).
    kv_cache_dtype: str = "auto"
    # Tokens of freed prefix-cache blocks kept findable even where reusing them would spare
    # touching a never-written block (which commits memory on the CPU): beyond this many, the
    # least recently freed are reused first (sorai/engine/block_manager.py), so RSS follows the
    # traffic's working set plus this much.
    prefix_cache_keep_tokens: int = 1024
    max_num_seqs: int = 32  # sequences in the running batch at once
    max_num_batched_tokens: int = 512  # tokens (prefill + decode) in one forward
    max_waiting: int = 256  # queued requests beyond which new ones are refused
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's context window
    # Torch threads on the CPU for decode steps; None: one less than the cores this process may
    # use, leaving a core to the HTTP server (measured on 2 cores under a server: 1 thread
    # decodes a batch of 16 twice as fast as 2, whose small matrix products stall whenever the
    # server's thread takes a core from one of them).
    cpu_threads: int | None = None
    # Threads for steps that compute at least `prefill_threads_from` prompt tokens: their large
    # matrix products are compute-bound and scale with cores. None: every core.
    cpu_prefill_threads: int | None = None
    prefill_threads_from: int = 64
    # LoRA adapters served unmerged (sorai.engine.adapters): how many hold a slot at once,
    # and the largest rank a slot takes (smaller ranks are padded to it).
    max_loras: int = 8
    max_lora_rank: int = 16
    # Prompt tokens that batch-priority sequences (priority > 0) compute in one step at most,
    # together: an interactive request arriving meanwhile waits for the step in flight, so
    # batch prompts go in chunks this small (interactive ones take max_num_batched_tokens).
    batch_prefill_chunk: int = 128
    # Bytes the resident adapters may take in their slots (None: only max_loras bounds them).
    max_lora_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_loras",
            "max_lora_rank",
            "batch_prefill_chunk",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SoraiError(f"engine {name} must be an integer >= 1, got {value!r}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise SoraiError(f"engine num_blocks must be >= 2, got {self.num_blocks!r}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise SoraiError(f"engine kv_cache_gib must be > 0, got {self.kv_cache_gib!r}")
        for name in ("cpu_threads", "cpu_prefill_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SoraiError(f"engine {name} must be an integer >= 1, got {value!r}")
        if self.max_lora_bytes is not None and (
            not isinstance(self.max_lora_bytes, int) or self.max_lora_bytes < 1
        ):
            raise SoraiError(
                f"engine max_lora_bytes must be an integer >= 1 or None, got "
                f"{self.max_lora_bytes!r}"
            )
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise SoraiError(
                f"engine kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if not isinstance(self.prefix_cache_keep_tokens, int) or self.prefix_cache_keep_tokens < 0:
            raise SoraiError(
                f"engine prefix_cache_keep_tokens must be an integer >= 0, got "
                f"{self.prefix_cache_keep_tokens!r}"
            )
        if self.max_waiting < 0:
            raise SoraiError(f"engine max_waiting must be >= 0, got {self.max_waiting!r}")

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache stores for a model computing in `model_dtype`."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        return KV_CACHE_DTYPES[self.kv_cache_dtype]

    def kv_blocks(self, bytes_per_block: int, context_length: int) -> int:
        """KV blocks to allocate: num_blocks, else as many as kv_cache_gib holds, else those
        of one `context_length`-token sequence within DEFAULT_KV_CACHE_GIB."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_cache_gib is not None:
            return max(2, int(self.kv_cache_gib * 2**30 // bytes_per_block))
        whole = -(-context_length // self.block_size)
        return max(2, min(whole, int(DEFAULT_KV_CACHE_GIB * 2**30 // bytes_per_block)))
