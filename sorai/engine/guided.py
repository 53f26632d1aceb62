"""Guided decoding with llguidance: compile a constraint once, mask each step's logits.

A GuidedSpec (JSON schema, any JSON object, regex, a list of choices or a Lark grammar) is
compiled into an llguidance grammar and a matcher for the model's tokenizer; compiled
matchers are cached by the spec's key and each sequence gets a cheap copy. Every step the
matcher fills a bitmask of the tokens that keep the output valid, the logits of the rest
become -inf, and the sampled token advances the matcher. When the grammar is complete only
EOS stays allowed, so the sequence ends with finish_reason "stop".

llguidance over xgrammar: no dependencies (xgrammar pulls transformers and triton), masks in
tens of microseconds on a 49k vocabulary thanks to its lexer/slicer, and it takes JSON
schema, regex and Lark (with embedded %json) in one grammar format.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sorai.engine.params import GuidedSpec
from sorai.errors import SamplingError
from sorai.model.tokenizer import Tokenizer

# JSON without free whitespace: a small model given the choice tends to emit it forever.
_JSON_OPTIONS: Any = {"whitespace_flexible": False}
_CACHE_SIZE = 256


def grammar_for(spec: GuidedSpec) -> str:
    """The llguidance grammar (as its JSON text) for a spec."""
    import llguidance

    matcher = llguidance.LLMatcher
    if spec.json_schema is not None:
        try:
            return matcher.grammar_from_json_schema(spec.json_schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise SamplingError(f"the JSON schema is not valid: {exc}") from None
    if spec.json_object:
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if spec.regex is not None:
        return matcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        # Lark string literals take JSON's escapes, so any choice text is quoted exactly.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return matcher.grammar_from_lark(f"start: {alternatives}")
    return matcher.grammar_from_lark(str(spec.grammar))


class GrammarCompiler:
    """Compiles specs for one tokenizer (thread-safe; the tokenizer is built on first use)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(
                self._tokenizer.backend.to_str(),
                n_vocab=self.vocab_size,
                eos_token=list(self._tokenizer.eos_token_ids) or None,
            )
        return self._ll_tokenizer

    def compile(self, spec: GuidedSpec) -> Any:
        """The cached matcher `spec` compiles to (never consumed: copy it, see matcher());
        SamplingError with llguidance's reason if the spec is bad."""
        import llguidance

        with self._lock:
            template = self._cache.get(spec.key)
            if template is not None:
                self._cache.move_to_end(spec.key)
                return template
            # The constructor compiles and, on a bad grammar, holds the reason in get_error():
            # one compilation, where validate_grammar first would make it two.
            template = llguidance.LLMatcher(self._llg_tokenizer(), grammar_for(spec), log_level=0)
            if template.is_error():
                raise SamplingError(
                    f"the guided decoding constraint cannot be used: {template.get_error()}"
                )
            self._cache[spec.key] = template
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return template

    def matcher(self, spec: GuidedSpec) -> Any:
        """A fresh matcher for one sequence (a cheap copy of the compiled one)."""
        return self.compile(spec).deep_copy()


def mask_logits(logits: Tensor, matchers: list[Any]) -> None:
    """Set to -inf, in place, the logits each row's matcher forbids (None: no constraint)."""
    # llguidance.numpy, not llguidance.torch: the latter compiles a kernel with torch.compile
    # at import, which costs seconds and is not needed on a [rows, vocab] mask.
    import llguidance.numpy as llg_np

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = logits.shape[-1]
    bitmask = llg_np.allocate_token_bitmask(len(rows), vocab)
    for j, i in enumerate(rows):
        llg_np.fill_next_token_bitmask(matchers[i], bitmask, j)
    # Token t is allowed when bit t % 32 of word t // 32 is set (little-endian bit order).
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    allowed = torch.from_numpy(bits).to(device=logits.device, dtype=torch.bool)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index)
    sub.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, index, sub)


def advance(matcher: Any, token_id: int) -> bool:
    """Feed the sampled token; True when the constrained output is complete."""
    if not matcher.consume_token(token_id) or matcher.is_error():
        # Cannot happen for a token the mask allowed; end the sequence rather than go on blind.
        return True
    return bool(matcher.is_stopped())
