"""The test oracle: plain single-sequence generation over a contiguous KV cache.

Not a product path (sorai.load's LLM runs on the engine); it exists so the engine's batching,
paging, chunking, prefix caching and preemption can be checked against the simplest loop that
is obviously right: prefill the prompt, then one token at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sorai.engine.config import EngineConfig
from sorai.engine.params import SamplingParams
from sorai.engine.sampler import SequenceState, process_logits, sample
from sorai.model.kv_cache import ContiguousKVCache
from sorai.model.transformer import Transformer


def oracle_tokens(
    model: Transformer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    eos_token_ids: Sequence[int] = (),
    prefill_chunk: int = 512,
    kv_dtype: torch.dtype | None = None,
) -> list[int]:
    """The tokens generated after `prompt_ids` until a stop token or max_tokens (the stop
    token itself not included, as the engine reports it). Stop strings and grammars are the
    engine's output handling, checked by their own tests. kv_dtype: how the cache stores keys
    and values, rounding them as the engine's cache does (None: as a default engine stores
    them, EngineConfig's kv_cache_dtype "auto")."""
    assert not params.stop and params.guided is None, "the oracle handles stop ids only"
    kv_dtype = kv_dtype or EngineConfig().kv_dtype(model.dtype)
    cache = ContiguousKVCache.for_model(model, len(prompt_ids) + params.max_tokens, dtype=kv_dtype)
    state = SequenceState(
        params,
        prompt_ids,
        model.config.vocab_size,
        eos_token_ids=eos_token_ids,
        device=model.device,
    )
    generated: list[int] = []
    with torch.inference_mode():
        ids = torch.tensor(list(prompt_ids), device=model.device)
        for start in range(0, len(ids), prefill_chunk):
            chunk = ids[start : start + prefill_chunk]
            positions = torch.arange(start, start + len(chunk), device=model.device)
            logits = model(chunk[None], positions, cache, last_only=True)[:, -1]
        position = len(prompt_ids)
        for _ in range(params.max_tokens):
            token = sample(process_logits(logits.float(), [state]), [state])
            token_id = int(token)
            state.append(token_id)
            if token_id in state.stop_token_ids:
                break
            generated.append(token_id)
            positions = torch.tensor([position], device=model.device)
            logits = model(token.view(1, 1), positions, cache)[:, -1]
            position += 1
    return generated


def top_two_gap(model: Transformer, ids: Sequence[int]) -> float:
    """The gap between the two highest logits after `ids`: how near a tie the next greedy
    pick is."""
    cache = ContiguousKVCache.for_model(model, len(ids), dtype=EngineConfig().kv_dtype(model.dtype))
    with torch.inference_mode():
        positions = torch.arange(len(ids), device=model.device)
        tokens = torch.tensor(list(ids), device=model.device)[None]
        logits = model(tokens, positions, cache, last_only=True)[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])
