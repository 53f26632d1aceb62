"""LLMEngine: add requests, step the batch, collect per-request outputs; abort at any time.

Single-threaded by design: AsyncEngine drives it from one thread, and tests drive it directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from typing import Any

import torch
from torch import Tensor

from sorai.engine.adapters import AdapterRegistry
from sorai.engine.block_manager import BlockPool
from sorai.engine.config import EngineConfig
from sorai.engine.guided.compile import GrammarCompiler, advance, mask_logits
from sorai.engine.images import ImageSpan, hash_ids, image_spans
from sorai.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from sorai.engine.paged_cache import PagedKVCache
from sorai.engine.params import SamplingParams
from sorai.engine.runner import ModelRunner
from sorai.engine.sampler import process_logits, sample
from sorai.engine.scheduler import Scheduler
from sorai.engine.sequence import Request, Sequence, Status
from sorai.errors import ContextLengthError, SamplingError, SoraiError
from sorai.hub import DEFAULT_MODEL
from sorai.model.fusion import fuse_projections
from sorai.model.loader import load_pretrained
from sorai.model.lora import check_adapter_dir
from sorai.model.quant import decode_path
from sorai.model.runtime import describe
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        name: str = "",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.model_name = name
        cfg = self.config
        self.threads: tuple[int, int] | None = None  # (decode, prompt) steps, on the CPU
        if model.device.type == "cpu":
            cores = len(os.sched_getaffinity(0))
            decode = cfg.cpu_threads or max(1, cores - 1)
            self.threads = (decode, cfg.cpu_prefill_threads or max(decode, cores))
            torch.set_num_threads(decode)
        fuse_projections(model)
        # Per server, never per step: a row's numbers must not depend on its batch.
        self.decode_path = decode_path.settle(model, cfg.max_num_seqs)
        self.runtime = describe(model, self.decode_path)
        num_kv_heads, head_dim = _kv_geometry(model)
        kv_dtype = cfg.kv_dtype(model.dtype)
        per_block = PagedKVCache.bytes_per_block(
            len(model.layers), cfg.block_size, num_kv_heads, head_dim, kv_dtype
        )
        window = model.config.context_length
        num_blocks = cfg.kv_blocks(per_block, min(cfg.max_model_len or window, window))
        self.cache = PagedKVCache(
            [int(i) for i in model.layers],
            num_blocks,
            cfg.block_size,
            num_kv_heads,
            head_dim,
            kv_dtype,
            model.device,
        )
        keep = -(-cfg.prefix_cache_keep_tokens // cfg.block_size)
        self.pool = BlockPool(num_blocks, cfg.enable_prefix_caching, keep_cached=keep)
        self.adapters = AdapterRegistry(
            model, cfg.max_loras, cfg.max_lora_rank, cfg.max_lora_bytes, base_name=name
        )
        self.scheduler = Scheduler(cfg, self.pool, cfg.block_size, admit=self._admit)
        self.runner = ModelRunner(model, self.cache, lambda: self.adapters.lora)
        self.vocab_size = model.config.vocab_size
        # One sequence must fit in the cache on its own, or it could never be scheduled.
        self.context_length = min(
            cfg.max_model_len or model.config.context_length,
            model.config.context_length,
            num_blocks * cfg.block_size,
        )
        self.guided = GrammarCompiler(tokenizer, self.vocab_size)
        self.requests: dict[str, Request] = {}
        self._aborts: set[str] = set()
        self.generation_tokens = 0
        self.steps = 0

    @classmethod
    def from_model(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        config: EngineConfig | None = None,
        adapter: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
        quantize: str = "auto",
        adapters: Mapping[str, str | os.PathLike] | None = None,
    ) -> LLMEngine:
        """Load a known model name, an HF directory or a .gguf file, with an optional PEFT
        LoRA adapter merged in (see sorai.model.loader.load_pretrained) and `adapters`
        ({name: PEFT adapter directory}) served unmerged, each request naming its own."""
        for path in (adapters or {}).values():
            check_adapter_dir(path)  # a missing or broken directory fails before the load
        transformer, tokenizer, name = load_pretrained(
            model, dtype, device, adapter, progress, quantize=quantize
        )
        engine = cls(transformer, tokenizer, config, name=name)
        for adapter_name, path in (adapters or {}).items():
            engine.adapters.add(adapter_name, path)
        return engine

    @staticmethod
    def kv_bytes_per_token(model: Transformer, config: EngineConfig | None = None) -> int:
        """Bytes of keys and values one token takes in the cache, over every layer."""
        num_kv_heads, head_dim = _kv_geometry(model)
        kv_dtype = (config or EngineConfig()).kv_dtype(model.dtype)
        return PagedKVCache.bytes_per_block(len(model.layers), 1, num_kv_heads, head_dim, kv_dtype)

    # -- requests -------------------------------------------------------------------------

    def check_request(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise the error a user should see for this request, before it is queued."""
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give at least one token")
        for token in prompt_ids:
            if not isinstance(token, int) or isinstance(token, bool):
                raise SoraiError(f"prompt token ids must be integers, got {token!r}")
            if not 0 <= token < self.vocab_size:
                raise SoraiError(
                    f"prompt token id {token} is outside the vocabulary [0, {self.vocab_size})"
                )
        total = len(prompt_ids) + params.max_tokens
        if total > self.context_length:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_length} tokens, but "
                f"{total} were requested ({len(prompt_ids)} in the prompt + {params.max_tokens}"
                " for the completion); shorten the prompt or lower max_tokens"
            )
        if params.adapter is not None:
            self.adapters.check(params.adapter)
        self._check_images(prompt_ids, params)
        if params.guided is not None:
            self.guided.compile(params.guided)  # cached for add_request, or says why not
        for token, _ in params.logit_bias:
            if token >= self.vocab_size:
                raise SamplingError(
                    f"logit_bias names token {token}, outside the vocabulary [0, {self.vocab_size})"
                )

    def add_request(
        self, request_id: str, prompt_ids: Seq[int], params: SamplingParams | None = None
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise SoraiError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        adapter = self.adapters.use(params.adapter) if params.adapter is not None else None
        try:
            request = self._create(request_id, prompt_ids, params)
        except BaseException:
            if adapter is not None:
                self.adapters.release(adapter, admitted=False)
            raise
        if adapter is not None:
            request.adapter, request.cache_salt = adapter, adapter.cache_salt
        self.requests[request_id] = request
        for seq in request.sequences:
            self.scheduler.add(seq)

    # -- images (a vision-language checkpoint: sorai/engine/images.py) ----------------------

    @property
    def image_encoder(self) -> Any:
        """The model's image encoder (sorai.model.llava.ImageEncoder), or None: text only."""
        return self.runner.image_encoder

    def _check_images(self, prompt_ids: Seq[int], params: SamplingParams) -> list[ImageSpan]:
        encoder = self.image_encoder
        if encoder is None:
            if params.images:
                raise SoraiError(
                    f"model {self.model_name!r} takes no images (it has no vision tower)"
                )
            return []
        return image_spans(
            prompt_ids, params.images, encoder.image_token_index, encoder.tokens_per_image
        )

    def _create(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams) -> Request:
        request = self._create_request(request_id, prompt_ids, params)
        spans = self._check_images(prompt_ids, params)
        if spans:
            request.image_spans, request.hash_prompt = spans, hash_ids(prompt_ids, spans)
        return request

    def _create_request(
        self, request_id: str, prompt_ids: Seq[int], params: SamplingParams
    ) -> Request:
        return Request.create(
            request_id,
            list(prompt_ids),
            params,
            self.tokenizer,
            self.vocab_size,
            max_len=len(prompt_ids) + params.max_tokens,
            arrival=time.monotonic(),
            device=self.model.device,
            new_matcher=self.guided.matcher,
            new_budget=self.guided.budget,
        )

    def _admit(self, seq: Sequence) -> bool:
        """Whether a waiting sequence may run now: its adapter, if any, has a slot."""
        request = seq.request
        if request.adapter is None or request.adapter_admitted:
            return True
        request.adapter_admitted = self.adapters.admit(request.adapter)
        return request.adapter_admitted

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at the start of the next step."""
        if request_id in self.requests:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample, and report what changed."""
        outputs = self._apply_aborts()
        sched = self.scheduler.schedule()
        if sched.scheduled:
            self._set_threads(sched.scheduled)
            seqs, logits = self.runner.execute(sched.scheduled)
            self.scheduler.after_step(sched)
            if seqs:
                self._sample(seqs, logits)
            self.steps += 1
        touched = {id(s.request): s.request for s, _ in sched.scheduled}
        for request in touched.values():
            for seq in request.sequences:
                if seq.finished and seq.status is not Status.FINISHED:
                    self.scheduler.finish(seq)
            outputs.append(self._output(request))
        return [o for o in outputs if o.choices or o.finished]

    def _set_threads(self, scheduled: Seq[tuple[Sequence, int]]) -> None:
        if self.threads is None:
            return
        prompt_tokens = sum(n for _, n in scheduled if n > 1)
        wanted = self.threads[prompt_tokens >= self.config.prefill_threads_from]
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _sample(self, seqs: list[Sequence], logits: Tensor) -> None:
        states = [s.state for s in seqs]
        matchers = [s.matcher for s in seqs]
        guided = any(m is not None for m in matchers)
        allowed = logits.float().clone() if guided else logits
        if guided:
            mask_logits(allowed, matchers)
        tokens = sample(process_logits(allowed, states), states)
        if guided:
            _force_budget(seqs, tokens)
        top = max((s.request.params.logprobs or 0) for s in seqs)
        want = [s.request.params.logprobs is not None for s in seqs]
        logprob_rows: list[TokenLogprob | None] = [None] * len(seqs)
        if any(want):
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
            top_values, top_ids = (
                logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], tokens[:, None][:, :0])
            )
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        token_list = tokens.tolist()
        for i, seq in enumerate(seqs):
            if want[i]:
                k = seq.request.params.logprobs or 0
                alternatives = list(zip(top_ids[i][:k], top_values[i][:k], strict=True))
                logprob_rows[i] = TokenLogprob(token_list[i], chosen[i], alternatives)
            done, error = False, None
            if seq.matcher is not None:
                done, error = advance(seq.matcher, token_list[i])
                if error is None and seq.budget is not None:
                    seq.budget.accept(token_list[i])
            seq.append(token_list[i], logprob_rows[i], grammar_done=done, error=error)
        self.generation_tokens += len(seqs)

    def _output(self, request: Request) -> RequestOutput:
        choices = [d for s in request.sequences if (d := s.take_delta()) is not None]
        finished = request.finished
        if finished:
            del self.requests[request.request_id]
            if request.adapter is not None:
                self.adapters.release(request.adapter, request.adapter_admitted)
                request.adapter = None
        return RequestOutput(
            request.request_id,
            choices,
            prompt_tokens=len(request.prompt_ids),
            cached_tokens=request.cached_tokens,
            finished=finished,
        )

    def _apply_aborts(self) -> list[RequestOutput]:
        outputs = []
        for request_id in self._aborts:
            request = self.requests.get(request_id)
            if request is None:
                continue
            for seq in request.sequences:
                seq.abort()
                self.scheduler.finish(seq)
            outputs.append(self._output(request))
        self._aborts.clear()
        return outputs

    def stats(self) -> EngineStats:
        s = self.scheduler.stats
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_used=self.pool.num_used,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            preemptions=s.preemptions,
            prompt_tokens=s.prompt_tokens,
            generation_tokens=self.generation_tokens,
            steps=self.steps,
        )


def _force_budget(seqs: list[Sequence], tokens: Tensor) -> None:
    """Replace, in place, the sampled token of each guided sequence whose budget says which
    token it must take (its output closing within max_tokens, or a looping string ending)."""
    for i, seq in enumerate(seqs):
        if seq.budget is not None and seq.matcher is not None:
            sampled = int(tokens[i])
            forced = seq.budget.force(seq.matcher, seq.max_len - seq.num_tokens, sampled)
            if forced is not None:
                tokens[i] = forced


def _kv_geometry(model: Transformer) -> tuple[int, int]:
    """(key/value heads, head dim) of the model's attention layers."""
    attention = next(iter(model.layers.values())).self_attn
    return attention.num_local_kv_heads, attention.head_dim
