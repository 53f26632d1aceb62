"""Guided decoding with llguidance: compile a constraint once, mask each step's logits.

A GuidedSpec (JSON schema, any JSON object, regex, a list of choices or a Lark grammar) is
compiled into an llguidance grammar and a matcher for the model's tokenizer; compiled
matchers are cached by the spec's key and each sequence gets a cheap copy. Every step the
matcher fills a bitmask of the tokens that keep the output valid, the logits of the rest
become -inf, and the sampled token advances the matcher. When the grammar is complete only
EOS stays allowed, so the sequence ends with finish_reason "stop"; a matcher that fails
mid-generation ends it with finish_reason "error" (never a normal stop).

llguidance over xgrammar: no dependencies (xgrammar pulls transformers and triton), masks in
tens of microseconds on a 49k vocabulary thanks to its lexer/slicer, and it takes JSON
schema, regex and Lark (with embedded %json) in one grammar format.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sorai.engine.guided.budget import Budget, Planner, Scan
from sorai.engine.params import GuidedSpec
from sorai.errors import SamplingError
from sorai.model.tokenizer import Tokenizer

# JSON without free whitespace: a small model given the choice tends to emit it forever.
_JSON_OPTIONS: Any = {"whitespace_flexible": False}
_CACHE_SIZE = 256
# The first line of tool_choice "auto"'s grammar (sorai/engine/tools.py): its budget applies to
# a call only, never to text (plain text cut by max_tokens ends with "length", as unguided).
TOOL_CALL_OR_TEXT = "// a tool call or text\n"
_WALK_LIMIT = 512  # tokens of the shortest completion tried when a constraint is compiled


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
        return matcher.grammar_from_regex(choice_regex(spec.choice))
    return matcher.grammar_from_lark(str(spec.grammar))


def choice_regex(choices: Iterable[str]) -> str:
    """One regex matching exactly the given strings, written as a trie (shared prefixes once).

    A Lark rule of N alternatives puts N items in one Earley row, and llguidance refuses rows
    of over 2,000 items mid-generation; one regex is one lexeme, matched by the lexer's automaton
    at any size. Every character but letters and digits is written as a \\x{..} escape, which
    Rust's regex syntax (llguidance's) reads as that character whatever it is.
    """
    trie: dict[str, Any] = {}
    for choice in choices:
        node = trie
        for char in choice:
            node = node.setdefault(char, {})
        node[_END] = {}
    return _trie_regex(trie)


_END = ""  # the trie key that marks the end of a choice (choices are never empty)


def _trie_regex(node: dict[str, Any]) -> str:
    branches = [_literal(c) + _trie_regex(child) for c, child in node.items() if c != _END]
    if not branches:
        return ""
    if len(branches) > 1:
        group = "(?:" + "|".join(branches) + ")"
        return group + "?" if _END in node else group
    if _END in node:  # a choice ends here and another goes on
        return branches[0] + "?" if len(branches[0]) == 1 else f"(?:{branches[0]})?"
    return branches[0]


def _literal(char: str) -> str:
    return char if char.isalnum() else f"\\x{{{ord(char):x}}}"


class GrammarCompiler:
    """Compiles specs for one tokenizer (thread-safe; the tokenizer is built on first use)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._planner: Planner | None = None

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
            tokenizer = self._llg_tokenizer()
        # The constructor compiles and, on a bad grammar, holds the reason in get_error():
        # one compilation, where validate_grammar first would make it two.
        template = llguidance.LLMatcher(tokenizer, grammar_for(spec), log_level=0)
        error = template.get_error() if template.is_error() else self._walk_error(template, spec)
        if error:
            raise SamplingError(f"the guided decoding constraint cannot be used: {error}")
        with self._lock:
            self._cache[spec.key] = template
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return template

    def _walk_error(self, template: Any, spec: GuidedSpec) -> str:
        """Why the shortest completion from the start fails, if it does ("" if not): a
        schema such as {"$ref": "#"} or a $ref cycle compiles, then admits no token or fails
        mid-way; that must be refused before queueing, not found while generating."""
        scan = Scan() if _is_json(spec) else None
        walk = self.planner().shortest(template, scan, _WALK_LIMIT)
        if walk.complete or not walk.error:
            return ""
        reason = _reason(walk.error)
        if reason.startswith("NoExtension"):
            return (
                "it admits no complete output (e.g. a schema that only refers to itself, such "
                'as {"$ref": "#"}, or a cycle of $refs)'
            )
        return reason

    def matcher(self, spec: GuidedSpec) -> Any:
        """A fresh matcher for one sequence (a cheap copy of the compiled one)."""
        return self.compile(spec).deep_copy()

    def planner(self) -> Planner:
        """The shortest-completion walk for this tokenizer (built on first use)."""
        with self._lock:
            if self._planner is None:
                self._planner = Planner(self._llg_tokenizer(), self.vocab_size)
            return self._planner

    def budget(self, spec: GuidedSpec) -> Budget:
        """A fresh budget keeper and loop guard for one sequence under `spec`."""
        call_or_text = spec.grammar is not None and spec.grammar.startswith(TOOL_CALL_OR_TEXT)
        return Budget(
            self.planner(),
            _is_json(spec) or call_or_text,
            spec.max_string_repeats,
            call_only=call_or_text,
        )


def _is_json(spec: GuidedSpec) -> bool:
    return spec.json_schema is not None or spec.json_object


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


def advance(matcher: Any, token_id: int) -> tuple[bool, str | None]:
    """Feed the sampled token: (the constrained output is complete, the matcher's error).

    A matcher in an error state (a grammar llguidance gave up on mid-generation, or a token
    it refused) is never a completed output: the caller ends the choice as an error.
    """
    if not matcher.consume_token(token_id) or matcher.is_error():
        reason = _reason(matcher.get_error())
        return False, f"guided decoding failed during generation: {reason}"
    return bool(matcher.is_stopped()), None


def _reason(error: str) -> str:
    # llguidance appends its parser state (<state> ...) to an error: not for the user.
    return error.split("\n<state>", 1)[0].strip() or "the matcher failed"
