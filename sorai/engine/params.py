"""Request parameters: how to pick tokens (SamplingParams) and what output is allowed (GuidedSpec).

Both validate on construction and raise SamplingError naming the bad value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from sorai.engine.guided.schema import close_objects
from sorai.errors import SamplingError

__all__ = ["GUIDED_FIELDS", "GuidedSpec", "SamplingParams"]

# Temperatures below this are treated as greedy (as vLLM does): dividing float32 logits by a
# near-zero temperature overflows to inf and the softmax turns into NaN.
_GREEDY_EPS = 1e-5
MAX_N = 128
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]; beyond it the distribution is near uniform
# torch.Generator.manual_seed accepts any value that fits in 64 bits unsigned.
_SEED_LIMIT = 2**64


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `max_tokens=True` is always a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalise_logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """{token id (int or numeric string, as JSON sends it): bias} -> sorted ((id, bias), ...)."""
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = list(items)
    except TypeError:
        raise SamplingError(f"logit_bias must map token ids to numbers, got {bias!r:.80}") from None
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise SamplingError(f"logit_bias must map token ids to numbers, got {bias!r:.80}")
        key, value = pair
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        if not _is_int(key) or key < 0:
            raise SamplingError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        if not _is_real(value) or not math.isfinite(value) or not -100 <= value <= 100:
            raise SamplingError(
                f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {key}"
            )
        out[key] = float(value)
    return tuple(sorted(out.items()))


def _schema_text(schema: Any, name: str) -> str:
    """A JSON schema given as an object or as JSON text -> JSON text (SamplingError naming
    `name`, as its param, if it is neither)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise SamplingError(f"{name} is not valid JSON: {exc.msg}", param=name) from None
    if isinstance(schema, bool):
        # JSON Schema's `true` allows anything, `false` nothing.
        if not schema:
            raise SamplingError(f"{name} is the schema false, which nothing matches", param=name)
        schema = {}
    if not isinstance(schema, Mapping):
        raise SamplingError(
            f"{name} must be a JSON schema (an object), got {type(schema).__name__}", param=name
        )
    # Key order is kept: llguidance emits properties in the order the schema lists them.
    return json.dumps(schema, ensure_ascii=False)


# The request fields that may constrain the output: OpenAI's response_format and vLLM's
# top-level extras. At most one may be given (a response_format of type "text" is none).
DEFAULT_STRING_REPEATS = 8

GUIDED_FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


@dataclass(frozen=True)
class GuidedSpec:
    """A constraint on what may be generated; exactly one kind is set.

    json_schema is the schema as JSON text; json_object asks for any JSON object; regex must
    match the whole output; choice is a list of exact strings; grammar is a Lark grammar
    (llguidance's dialect, which also takes `%json {...}` for embedded schemas).
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    # Inside a JSON string, a run of tokens repeated more than this many times in a row ends
    # the string (a small model otherwise loops there until max_tokens).
    max_string_repeats: int = DEFAULT_STRING_REPEATS

    def __post_init__(self) -> None:
        repeats = self.max_string_repeats
        if not _is_int(repeats) or repeats < 1:
            raise SamplingError(
                f"max_string_repeats must be an integer >= 1, got {repeats!r:.40}",
                param="max_string_repeats",
            )
        if self.choice is not None:
            choice = tuple(self.choice) if not isinstance(self.choice, str) else None
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise SamplingError(
                    f"guided_choice must be a non-empty list of non-empty strings, "
                    f"got {self.choice!r:.80}"
                )
            object.__setattr__(self, "choice", choice)
        for name in ("json_schema", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SamplingError(f"guided {name} must be a non-empty string, got {value!r:.80}")
        kinds = [self.json_schema, self.json_object or None, self.regex, self.choice, self.grammar]
        if sum(k is not None for k in kinds) != 1:
            raise SamplingError(
                "give exactly one guided decoding constraint (json_schema, json_object, regex, "
                "choice or grammar)"
            )

    @classmethod
    def from_request(
        cls,
        response_format: Mapping[str, Any] | None = None,
        guided_json: Mapping[str, Any] | str | None = None,
        guided_regex: str | None = None,
        guided_choice: Sequence[str] | None = None,
        guided_grammar: str | None = None,
        max_string_repeats: int | None = None,
    ) -> GuidedSpec | None:
        """The constraint an OpenAI-style request asks for (response_format, or one of the
        guided_* extras), or None; SamplingError when it is malformed or several are given."""
        spec, _ = cls.from_fields(
            {
                "response_format": response_format,
                "guided_json": guided_json,
                "guided_regex": guided_regex,
                "guided_choice": guided_choice,
                "guided_grammar": guided_grammar,
                "max_string_repeats": max_string_repeats,
            }
        )
        return spec

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> tuple[GuidedSpec | None, str | None]:
        """(the constraint, the field that asked for it), or (None, None) without one.

        `fields` maps GUIDED_FIELDS, and optionally "max_string_repeats" (the loop guard's
        bound), to their values (None: absent). Errors are SamplingErrors whose `param` names
        the field at fault ("response_format.type", "guided_choice.1"); whether llguidance can
        compile the constraint is checked later, by the engine.
        """
        found: list[tuple[str, GuidedSpec]] = []
        for name in GUIDED_FIELDS:
            value = fields.get(name)
            if value is None:
                continue
            try:
                spec = cls._from_field(name, value)
            except SamplingError as exc:
                if exc.param is None:
                    exc.param = name
                raise
            if spec is not None:
                found.append((name, spec))
        if len(found) > 1:
            names = " and ".join(name for name, _ in found)
            raise SamplingError(
                "give at most one output constraint (response_format or one guided_* field); "
                f"got {names}",
                param=found[1][0],
            )
        if not found:
            return None, None
        name, spec = found[0]
        repeats = fields.get("max_string_repeats")
        if repeats is not None:
            spec = replace(spec, max_string_repeats=repeats)
        return spec, name

    @classmethod
    def _from_field(cls, name: str, value: Any) -> GuidedSpec | None:
        if name == "response_format":
            return cls._from_response_format(value)
        if name == "guided_json":
            return cls(json_schema=_schema_text(value, name))
        if name == "guided_choice":
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
                raise SamplingError(
                    f"guided_choice must be a non-empty list of strings, got {value!r:.60}",
                    param=name,
                )
            for i, choice in enumerate(value):
                if not isinstance(choice, str) or not choice:
                    raise SamplingError(
                        f"guided_choice must hold non-empty strings, got {choice!r:.60}",
                        param=f"{name}.{i}",
                    )
            return cls(choice=tuple(value))
        if not isinstance(value, str) or not value.strip():
            raise SamplingError(f"{name} must be a non-empty string", param=name)
        if name == "guided_regex":
            return cls(regex=value)
        return cls(grammar=value)

    @classmethod
    def _from_response_format(cls, fmt: Any) -> GuidedSpec | None:
        param = "response_format"
        if not isinstance(fmt, Mapping):
            raise SamplingError(
                'response_format must be an object such as {"type": "json_object"}, '
                f"got {fmt!r:.60}",
                param=param,
            )
        kind = fmt.get("type", "text")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return cls(json_object=True)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, Mapping):
                raise SamplingError(
                    'response_format of type json_schema needs "json_schema": '
                    '{"name": ..., "schema": {...}}',
                    param=f"{param}.json_schema",
                )
            name = spec.get("name")
            if name is not None and not isinstance(name, str):
                raise SamplingError(
                    "response_format.json_schema.name must be a string",
                    param=f"{param}.json_schema.name",
                )
            strict = spec.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise SamplingError(
                    "response_format.json_schema.strict must be true or false",
                    param=f"{param}.json_schema.strict",
                )
            if spec.get("schema") is None:
                # OpenAI makes the schema optional: without one, any JSON object.
                return cls(json_object=True)
            # Always enforced, strict or not: the output matches the schema. Strict also
            # closes the objects that do not say otherwise, as OpenAI's strict mode.
            text = _schema_text(spec["schema"], f"{param}.json_schema.schema")
            if strict:
                text = json.dumps(close_objects(json.loads(text)), ensure_ascii=False)
            return cls(json_schema=text)
        raise SamplingError(
            f"response_format type must be 'text', 'json_object' or 'json_schema', "
            f"got {kind!r:.60}",
            param=f"{param}.type",
        )

    @property
    def key(self) -> str:
        """Names the compiled grammar: equal specs share one compilation."""
        if self.json_schema is not None:
            return "json_schema:" + self.json_schema
        if self.json_object:
            return "json_object"
        if self.regex is not None:
            return "regex:" + self.regex
        if self.choice is not None:
            return "choice:" + "\x00".join(self.choice)
        return "grammar:" + str(self.grammar)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; fields follow the OpenAI / vLLM names and meanings."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    # HF semantics: over prompt + generated tokens; positive logits divided, negative multiplied.
    repetition_penalty: float = 1.0
    # OpenAI semantics: over generated tokens only, subtracted from the logits.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    # None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely tokens'.
    logprobs: int | None = None
    # token id -> bias added to its logit before sampling (OpenAI: -100 bans, 100 forces).
    logit_bias: tuple[tuple[int, float], ...] = ()
    guided: GuidedSpec | None = None  # constrained decoding (JSON schema, regex, choice, ...)
    # The LoRA adapter (a name registered with the engine) the request runs under; None: base.
    adapter: str | None = None
    # Scheduling class, not sampling: lower runs first (0: interactive, 1: batch jobs).
    priority: int = 0
    # Prompt input, not sampling: the prompt's images (sorai.engine.images.PromptImage), in
    # the order of their image tokens, for a model with an image encoder.
    images: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        # Normalise first (frozen, hence object.__setattr__), then validate the normalised values.
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Iterable):
            stop = tuple(stop)
        else:
            raise SamplingError(
                f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}"
            )
        object.__setattr__(self, "stop", stop)

        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        elif _is_int(ids):
            ids = (ids,)
        elif isinstance(ids, Iterable) and not isinstance(ids, (str, bytes)):
            ids = tuple(ids)
        else:
            raise SamplingError(
                f"stop_token_ids must be a list of token ids, got {type(ids).__name__} {ids!r}"
            )
        object.__setattr__(self, "stop_token_ids", ids)
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))

        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            self._check_real(name)
        for name in ("presence_penalty", "frequency_penalty"):
            self._check_real(name)

        if not _is_int(self.priority) or self.priority < 0:
            raise SamplingError(f"priority must be an integer >= 0, got {self.priority!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise SamplingError(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}"
            )
        # top_p 0 (OpenAI accepts it) keeps only the most likely token: the sampler always does.
        if not 0 <= self.top_p <= 1:
            raise SamplingError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}"
            )
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise SamplingError(f"{name} must be in [-2, 2], got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _SEED_LIMIT):
            raise SamplingError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop strings must be non-empty strings, got {s!r}")
        for i in self.stop_token_ids:
            if not _is_int(i) or i < 0:
                raise SamplingError(f"stop_token_ids must be integers >= 0, got {i!r}")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise SamplingError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise SamplingError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise SamplingError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        if self.guided is not None and not isinstance(self.guided, GuidedSpec):
            raise SamplingError(f"guided must be a GuidedSpec, got {self.guided!r:.80}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise SamplingError(
                f"adapter must be the name of a loaded LoRA adapter, got {self.adapter!r:.60}"
            )
        if self.min_tokens > self.max_tokens:
            raise SamplingError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens!r}"
            )

    def _check_real(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_real(value):
            raise SamplingError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        # NaN fails every range comparison silently, and inf passes some (temperature=inf
        # turns masked logits into NaN), so both need their own check.
        if not math.isfinite(value):
            raise SamplingError(f"{name} must be a finite number, got {value!r}")
        object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token (temperature 0)."""
        return self.temperature < _GREEDY_EPS

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The option names from_options accepts."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> SamplingParams:
        """Build from user options (e.g. a request body); None values mean "use the default"."""
        options = dict(options or {})
        valid = cls.field_names()
        unknown = sorted(k for k in options if k not in valid)
        if unknown:
            raise SamplingError(
                f"unknown sampling option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(valid)}"
            )
        return cls(**{k: v for k, v in options.items() if v is not None})
