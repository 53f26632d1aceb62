"""Structured output that fits its budget: close it before max_tokens runs out, end looping strings.

Every step a guided sequence's Budget checks that the output could still be completed within
max_tokens after the sampled token: it walks a copy of the matcher along a short valid
completion (forced tokens, then EOS if the grammar is complete, else, for JSON, the token that
closes most: `"` inside a string, `}` `]` (or `"}`, `]}` ...) outside one, a due `,`, `0` for a
value; for other grammars a breadth-first search over single-byte tokens, in the last
_SEARCH_WINDOW tokens only).
When that completion would not fit, the sampled token is replaced by the completion's first
token from where the output stands, and the sequence follows it to the end: the output ends
complete and valid with finish_reason "stop" and stop_reason "budget"; only a budget smaller
than the shortest completion ends with "length". The same walk, at compile time, refuses
constraints that fail before they can end.

The loop guard: inside a JSON string, a run of 1-16 tokens repeated more than
`max_string_repeats` times in a row ends the string (the closing quote is forced), and
decoding goes on from there.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

_MAX_PERIOD = 16  # the longest repeated run of tokens the loop guard looks for
_MAX_PROBES = 160  # matcher copies one search of a non-JSON grammar may make (~50 ms)
# A non-JSON grammar's search runs only this close to max_tokens: it is costlier than JSON's
# walk, and regex or choice outputs are short.
_SEARCH_WINDOW = 32
_QUOTE, _BACKSLASH = 0x22, 0x5C


@dataclass(frozen=True)
class Scan:
    """Where a JSON text stands lexically: inside a string or not, after a backslash or not."""

    in_string: bool = False
    escaped: bool = False

    def after(self, data: bytes) -> Scan:
        in_string, escaped = self.in_string, self.escaped
        for byte in data:
            if escaped:
                escaped = False
            elif in_string and byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = not in_string
        return Scan(in_string, escaped)


class Walk(NamedTuple):
    tokens: list[int]
    complete: bool
    error: str = ""  # why the walk stopped short, when the matcher failed on the way


class Planner:
    """The shortest-completion walk for one tokenizer (built once per GrammarCompiler)."""

    def __init__(self, ll_tokenizer: Any, vocab_size: int) -> None:
        self._tok = ll_tokenizer
        self.vocab_size = vocab_size
        self.eos = list(ll_tokenizer.eos_tokens)
        self._bytes: dict[int, bytes] = {}
        closers_in, closers_out, single = [], [], []
        for token in range(min(vocab_size, ll_tokenizer.vocab_size)):
            if ll_tokenizer.is_special_token(token):
                continue
            data = ll_tokenizer.decode_bytes([token])
            if len(data) == 1:
                single.append(token)
            if data and set(data) <= {ord("}"), ord("]")}:
                closers_out.append((len(data), token))
            elif len(data) > 0 and data[0] == _QUOTE and set(data[1:]) <= {ord("}"), ord("]")}:
                closers_in.append((len(data), token))
        # Longest first: `"}` closes a string and its object in one token where both may end.
        self._closers_in = [t for _, t in sorted(closers_in, reverse=True)]
        self._closers_out = [t for _, t in sorted(closers_out, reverse=True)]
        single.sort()
        self._single_bytes = single
        self._single_kinds = [_kind(ll_tokenizer.decode_bytes([t])[0]) for t in single]
        self._quote = self._single(b'"')
        # Outside a string, after the closers: a comma where one is due (a required key, an
        # array's minItems), else the shortest values.
        self._values = [self._single(b) for b in (b",", b"0", b'"')]

    def _single(self, text: bytes) -> int:
        ids = self._tok.tokenize_bytes(text)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer has no single token for {text!r}")
        return ids[0]

    def token_bytes(self, token: int) -> bytes:
        data = self._bytes.get(token)
        if data is None:
            data = b"" if self._tok.is_special_token(token) else self._tok.decode_bytes([token])
            self._bytes[token] = data
        return data

    def shortest(self, matcher: Any, scan: Scan | None, limit: int) -> Walk:
        """The greedy shortest completion from `matcher`'s state, at most `limit` tokens
        (complete False when it needs more, or the matcher fails on the way: then `error`).

        `scan` is the JSON lexical state of the output so far, or None for a non-JSON grammar.
        The tokens end with an EOS when the grammar, complete, would still take more.
        """
        if scan is None:
            return self._search(matcher, limit)
        m = matcher.deep_copy()
        plan: list[int] = []
        words = np.empty((self.vocab_size + 31) // 32, dtype=np.uint32)
        while len(plan) < limit and not m.is_error():
            if m.is_stopped():
                return Walk(plan, True)
            forced = m.compute_ff_tokens()[: limit - len(plan)]
            if forced:
                if not m.consume_tokens(forced):
                    break
                plan += forced
                if scan is not None:
                    scan = scan.after(b"".join(self.token_bytes(t) for t in forced))
                continue
            m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            if m.is_error():
                break
            eos = next((t for t in self.eos if _allowed(words, t)), None)
            if eos is not None:
                return Walk(plan + [eos], True)
            token = self._pick(words, scan)
            if token is None:
                return Walk(plan, False, "no token is allowed")
            if not m.consume_token(token):
                break
            plan.append(token)
            if scan is not None:
                scan = scan.after(self.token_bytes(token))
        return Walk(plan, False, m.get_error() if m.is_error() else "")

    def close_string(self, words: np.ndarray) -> int | None:
        """The closing quote alone, if allowed now."""
        return self._quote if _allowed(words, self._quote) else None

    def _pick(self, words: np.ndarray, scan: Scan) -> int | None:
        preferred = self._closers_in if scan.in_string else self._closers_out + self._values
        for token in preferred:
            if _allowed(words, token):
                return token
        return _lowest(words)

    def _candidates(self, words: np.ndarray) -> list[int]:
        """The allowed single-byte tokens, one per class: a lowercase letter, an uppercase
        one, a digit, a non-ASCII byte, and each other byte (punctuation, space) on its own."""
        picked: dict[int, int] = {}
        for token, kind in zip(self._single_bytes, self._single_kinds, strict=True):
            if kind not in picked and _allowed(words, int(token)):
                picked[kind] = int(token)
        return list(picked.values())

    def _search(self, matcher: Any, limit: int) -> Walk:
        """Any grammar: the shortest completion over single-byte tokens (and forced tokens),
        breadth-first, one token per byte class (see _kind) and one state per length, last
        token and mask; at most _MAX_PROBES matcher copies."""
        words = np.empty((self.vocab_size + 31) // 32, dtype=np.uint32)
        queue: list[tuple[int, int, list[int], Any]] = [(0, 0, [], matcher.deep_copy())]
        seen: set[bytes] = set()
        probes = 0
        while queue and probes < _MAX_PROBES:
            _, _, path, m = heapq.heappop(queue)
            if m.is_error():
                if not path:
                    return Walk([], False, m.get_error())
                continue
            if m.is_stopped():
                return Walk(path, True)
            forced = m.compute_ff_tokens()
            if forced:
                if len(path) + len(forced) <= limit and m.consume_tokens(forced):
                    probes += 1
                    heapq.heappush(queue, (len(path) + len(forced), probes, path + forced, m))
                continue
            m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            if m.is_error():
                if not path:
                    return Walk([], False, m.get_error())
                continue
            eos = next((t for t in self.eos if _allowed(words, t)), None)
            if eos is not None and len(path) < limit:
                return Walk(path + [eos], True)
            # Same length, last token and mask: the same state for the search's purposes (a
            # mask alone does not tell `[0-9]{2}` after one digit from after a space before it).
            last = path[-1] if path else -1
            key = len(path).to_bytes(4, "little") + last.to_bytes(4, "little", signed=True)
            key += words.tobytes()
            if key in seen or len(path) >= limit:
                continue
            seen.add(key)
            candidates = self._candidates(words)
            if not candidates:
                lowest = _lowest(words)
                if lowest is None:
                    if not path:
                        return Walk([], False, "no token is allowed")
                    continue
                candidates = [lowest]
            for token in candidates:
                child = m.deep_copy()
                probes += 1
                if child.consume_token(token):
                    heapq.heappush(queue, (len(path) + 1, probes, path + [token], child))
        return Walk([], False)


def _kind(byte: int) -> int:
    """Bytes that grammars rarely tell apart share a kind (a search tries one of each)."""
    char = chr(byte)
    if byte >= 0x80:
        return 256
    if char.islower():
        return 257
    if char.isupper():
        return 258
    if char.isdigit():
        return 259
    return byte


def _lowest(words: np.ndarray) -> int | None:
    nonzero = np.flatnonzero(words)
    if not len(nonzero):
        return None
    word = int(nonzero[0])
    value = int(words[word])
    return word * 32 + ((value & -value).bit_length() - 1)


def _allowed(words: np.ndarray, token: int) -> bool:
    return bool((int(words[token >> 5]) >> (token & 31)) & 1)


@dataclass
class Budget:
    """One guided sequence's budget keeper and loop guard (see the module docstring)."""

    planner: Planner
    json: bool  # the output is JSON text: the loop guard and the string-aware walk apply
    max_string_repeats: int
    call_only: bool = False  # off unless the output starts with `{` (tool_choice "auto")
    closing: bool = False  # following the shortest completion to the end
    scan: Scan = field(default_factory=Scan)
    _string: list[int] = field(default_factory=list)  # the current string's tokens
    _end_string: bool = False  # the loop guard fired: force the closing quote
    _plan: list[int] = field(default_factory=list)  # the completion being followed
    _text: bool | None = None  # call_only: the output is text (None: nothing taken yet)

    def force(self, matcher: Any, remaining: int, sampled: int) -> int | None:
        """The token this step must take instead of `sampled` (None: the sampled one stands).
        `remaining` is how many tokens may still be generated, this one included.

        The sampled token stands while the output can still be completed after it within
        the budget; else (or once closing) the shortest completion's next token is taken.
        """
        planner = self.planner
        if self.call_only:
            if self._text is None:
                self._text = not planner.token_bytes(sampled).startswith(b"{")
            if self._text:
                return None
        scan = self.scan if self.json else None
        if self._end_string and self.scan.in_string:
            words = np.empty((planner.vocab_size + 31) // 32, dtype=np.uint32)
            matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            quote = planner.close_string(words)
            if quote is not None:
                return quote
        if scan is None and remaining > _SEARCH_WINDOW:
            return None
        if not self.closing:
            after = matcher.deep_copy()
            if not after.consume_token(sampled) or after.is_error() or after.is_stopped():
                return None  # an EOS, a completed output, or an error the matcher reports
            data = planner.token_bytes(sampled)
            walk = planner.shortest(after, scan.after(data) if scan else None, remaining - 1)
            if walk.complete or (walk.error and len(walk.tokens) < remaining - 1):
                return None  # it still fits, or the walk failed (decode on as usual)
        if not self._plan:
            # Followed from here to the end: the output is now the plan's (a recomputed plan
            # would be the same for JSON's greedy walk, and costly for other grammars).
            self._plan = planner.shortest(matcher, scan, remaining).tokens
            if not self._plan:
                return None
        self.closing = True
        return self._plan.pop(0)

    def accept(self, token: int) -> None:
        """Record the token the sequence took (after the matcher consumed it)."""
        if self.call_only and self._text is None:
            self._text = not self.planner.token_bytes(token).startswith(b"{")
        if not self.json or (self.call_only and self._text):
            return
        was_in = self.scan.in_string
        self.scan = self.scan.after(self.planner.token_bytes(token))
        if not self.scan.in_string:
            self._string.clear()
            self._end_string = False
            return
        if not was_in:
            self._string.clear()
        self._string.append(token)
        if _repeats(self._string, self.max_string_repeats):
            self._end_string = True


def _repeats(tokens: list[int], bound: int) -> bool:
    """True when `tokens` end with a run of 1-16 tokens repeated more than `bound` times."""
    for period in range(1, _MAX_PERIOD + 1):
        span = period * (bound + 1)
        if span > len(tokens):
            break
        tail = tokens[-span:]
        if tail[period:] == tail[:-period]:
            return True
    return False
