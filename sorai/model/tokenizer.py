"""Text <-> token ids for a model (from a Hugging Face directory or GGUF metadata), chat templates,
and streaming detokenization that never splits a UTF-8 character.

The tokenizer applies a chat template to the messages it is given; which messages and tool
definitions those are (OpenAI's normalised, or tools in the fallback format) is decided by the
chat renderer, sorai/model/chat.py, which serving and training both go through."""

from __future__ import annotations

import functools
import json
import numbers
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from sorai.errors import ModelFormatError, SoraiError

# The named special tokens Hugging Face passes to every chat template (its `special_tokens_map`).
_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# End-of-turn markers of common chat formats. Generation must stop on them even when the model's
# eos_token is the pretraining <|endoftext|>, as chat fine-tunes end each reply with these.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|END_OF_TURN_TOKEN|>",
    "<|end_of_turn|>",
    "<|endofturn|>",
    "<|return|>",
    "<|call|>",
)

# Fill-in-the-middle tokens of code models: (prefix, suffix, middle, the token that ends the
# middle where it is not EOS). All are prefix-suffix-middle: the model writes what goes between.
_FIM_CONVENTIONS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", None),  # StarCoder, SantaCoder
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", None),  # Qwen2.5-Coder
    ("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"),  # CodeLlama (SentencePiece)
    ("<PRE>", "<SUF>", "<MID>", "<EOT>"),  # CodeLlama, spelled without the word marker
    # DeepSeek-Coder: <｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜>
    (
        "<\uff5cfim\u2581begin\uff5c>",
        "<\uff5cfim\u2581hole\uff5c>",
        "<\uff5cfim\u2581end\uff5c>",
        None,
    ),
)

# A template that reads the `tools` variable renders tool definitions (and so calls) itself.
_TOOLS_VARIABLE = re.compile(r"\btools\b")

# llama.cpp token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Context vLLM keeps from the prompt so the first generated token decodes with the right spacing.
_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 byte tokens; pending text still broken after this many tokens
# holds genuinely invalid bytes and is let through rather than buffered forever.
_MAX_PENDING_TOKENS = 8

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class FimTokens:
    """A code model's fill-in-the-middle token ids."""

    prefix: int
    suffix: int
    middle: int
    end: tuple[int, ...] = ()  # ends the middle besides the model's EOS ids


@dataclass(frozen=True)
class _ByteLevelPre:
    """How the original tokenizer.json of a byte-level BPE model pre-tokenized text.

    GGUF keeps only llama.cpp's name for it (`tokenizer.ggml.pre`); the merges were learned on
    exactly this split, so using a different one changes ids (e.g. numbers, whitespace runs).
    """

    split: str | None = None  # a Split regex run before ByteLevel(use_regex=False)
    individual_digits: bool = False  # StarCoder-family Digits pre-tokenizer before ByteLevel
    nfc: bool = False  # Qwen2 normalizes to NFC before splitting
    ignore_merges: bool = False  # Llama 3 takes a whole-word vocab hit before applying merges


_DIGITS = _ByteLevelPre(individual_digits=True)
_LLAMA3 = _ByteLevelPre(split=_LLAMA3_SPLIT, ignore_merges=True)
_QWEN2 = _ByteLevelPre(split=_QWEN2_SPLIT, nfc=True)
_BYTE_LEVEL_PRE: dict[str, _ByteLevelPre] = {
    "smollm": _DIGITS,
    "starcoder": _DIGITS,
    "refact": _DIGITS,
    "codeshell": _DIGITS,
    "command-r": _DIGITS,
    "exaone": _DIGITS,
    "minerva-7b": _DIGITS,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "dbrx": _LLAMA3,
    "chatglm-bpe": _ByteLevelPre(split=_LLAMA3_SPLIT),
    "pixtral": _ByteLevelPre(split=_LLAMA3_SPLIT),
    "lfm2": _ByteLevelPre(split=_LLAMA3_SPLIT),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "megrez": _QWEN2,
    "stablelm2": _ByteLevelPre(split=_QWEN2_SPLIT),
    "qwen35": _ByteLevelPre(split=_QWEN35_SPLIT, nfc=True),
    "tekken": _ByteLevelPre(split=_TEKKEN_SPLIT),
    "gpt-4o": _ByteLevelPre(split=_GPT4O_SPLIT),
    "llama4": _ByteLevelPre(split=_GPT4O_SPLIT),
}


def gguf_pre_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer of a byte-level BPE
    tokenizer.json (`spec`, parsed): the first _BYTE_LEVEL_PRE entry that splits text the same
    way, or "default" (GPT-2's own split) where none does."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split = next(
        (s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None
    )
    found = _ByteLevelPre(
        split=split,
        individual_digits=any(
            s.get("type") == "Digits" and s.get("individual_digits") for s in steps
        ),
        nfc=(spec.get("normalizer") or {}).get("type") == "NFC",
        ignore_merges=bool((spec.get("model") or {}).get("ignore_merges")),
    )
    return next((name for name, known in _BYTE_LEVEL_PRE.items() if known == found), "default")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def _byte_decoder() -> dict[str, int]:
    return {char: byte for byte, char in _bytes_to_unicode().items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not readable JSON ({_first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as serialized AddedTokens.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_int(value: Any) -> int | None:
    # GGUF readers may hand back numpy integers rather than int.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) as a no-op,
    so templates written for HF's training masks still render."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation (wrong role order, ...): the caller's fault.
    raise SoraiError(f"chat template rejected the messages: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, ') which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_jinja_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    # Same settings as transformers, so a template renders byte-for-byte as it does there.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    pieces, best score first (the same order transformers derives, so ids match it)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    token_scores = dict(zip(tokens, scores, strict=False))
    merges: list[tuple[str, str, float]] = []
    for token, score in token_scores.items():
        local = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _parse_merges(raw: Sequence[str]) -> list[tuple[str, str]]:
    merges = []
    for line in raw:
        parts = line.split(" ")
        if len(parts) != 2:
            raise ModelFormatError(f"GGUF tokenizer.ggml.merges: malformed merge {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class TextParts(str):
    """A message's content string that iterates as OpenAI-style typed parts: a template that
    prints the content sees the text, one that loops over its parts (llava-hf's processor
    templates: images first, then texts; a plain string renders as nothing there) sees
    [{"type": "text", "text"}, {"type": "image"}, ...]."""

    parts: tuple[dict[str, str], ...] = ()

    def __new__(cls, text: str, parts: Sequence[dict[str, str]]) -> TextParts:
        self = super().__new__(cls, text)
        self.parts = tuple(parts)
        return self

    def __iter__(self) -> Iterator[dict[str, str]]:  # type: ignore[override]
        return iter(self.parts)


def _with_typed_parts(message: Any, image_text: str) -> Any:
    """`message` with its string content as TextParts: each `image_text` an image part, the
    text between (less the newlines that joined the parts) text parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or isinstance(content, TextParts):
        return message
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(content.split(image_text)):
        if k:
            parts.append({"type": "image"})
        piece = piece.strip("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return {**message, "content": TextParts(content, parts)}


class Tokenizer:
    """A model's tokenizer: the Rust `tokenizers` backend plus special tokens and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        name: str = "model",
        special_tokens: dict[str, str | None] | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_templates: dict[str, str] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.backend = backend
        self.name = name
        tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._special_tokens = tokens
        self.bos_token: str | None = tokens.get("bos_token")
        self.eos_token: str | None = tokens.get("eos_token")
        self.vocab_size: int = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = self.token_to_id(self.bos_token)
        self.special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        self._chat_templates = dict(chat_templates or {})
        self.chat_template: str | None = self._chat_templates.get("default")
        self._compiled: dict[str, jinja2.Template] = {}
        # A vision-language model's image token text (set by the loader; sorai/model/llava.py):
        # message contents then also read as typed parts, as its template may expect.
        self.image_text: str | None = None

        eos: list[int] = []
        for tid in (self.token_to_id(self.eos_token), *eos_token_ids, *self._end_of_turn_ids()):
            if tid is not None and tid not in eos:
                eos.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        if self.eos_token is None and eos:
            self.eos_token = self.id_to_token(eos[0])

        # Observed rather than read from config: the post-processor is what actually runs, and
        # transformers v5 also ignores tokenizer_config's add_bos_token next to a tokenizer.json.
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        self.add_bos_token: bool = (
            self.bos_token_id is not None
            and len(full) > len(plain)
            and full[0] == self.bos_token_id
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token!r}, eos_ids={self.eos_token_ids})"
        )

    def _end_of_turn_ids(self) -> list[int]:
        templates = "\n".join(self._chat_templates.values())
        ids = []
        for token in _END_OF_TURN_TOKENS:
            tid = self.token_to_id(token)
            if token in templates and tid is not None and tid in self.special_ids:
                ids.append(tid)
        return ids

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (tokenizer.json + its config files)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(
                f"{path}: no tokenizer.json (sorai needs a Hugging Face fast tokenizer file)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust loader raises plain Exception subclasses
            raise ModelFormatError(
                f"{tokenizer_file}: cannot be read as a tokenizer ({_first_line(exc)})"
            ) from exc
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")

        # Old repos may list added tokens only in tokenizer_config.json; transformers adds them too.
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for entry in decoder.values():
                content = _token_content(entry)
                if content is None or backend.token_to_id(content) is not None:
                    continue
                token = AddedToken(content, special=bool(entry.get("special")), normalized=False)
                if token.special:
                    backend.add_special_tokens([token])
                else:
                    backend.add_tokens([token])

        special_tokens = {
            name: _token_content(config.get(name)) or _token_content(special_map.get(name))
            for name in _SPECIAL_TOKEN_NAMES
        }
        if special_tokens["bos_token"] is None:
            bos_ids = _as_id_list(generation.get("bos_token_id"))
            if bos_ids:
                special_tokens["bos_token"] = backend.id_to_token(bos_ids[0])
        return cls(
            backend,
            name=path.name,
            special_tokens=special_tokens,
            eos_token_ids=_as_id_list(generation.get("eos_token_id")),
            chat_templates=cls._read_chat_templates(path, config),
        )

    def save(self, path: Path) -> None:
        """Write a Hugging Face tokenizer directory that from_dir (and transformers) read back."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            **self._special_tokens,
        }
        if self.eos_token is not None:
            config["eos_token"] = self.eos_token
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, template in self._chat_templates.items():
            target = path / "chat_template.jinja"
            if name != "default":
                target = path / "additional_chat_templates" / f"{name}.jinja"
                target.parent.mkdir(exist_ok=True)
            target.write_text(template, encoding="utf-8")
        generation = {"eos_token_id": list(self.eos_token_ids)}
        if self.bos_token_id is not None:
            generation["bos_token_id"] = self.bos_token_id
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    @staticmethod
    def _read_chat_templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
        # Priority as in transformers: chat_template.jinja, then chat_template.json, then the
        # tokenizer_config entry (a string, or a list of named templates).
        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            for item in raw:
                if isinstance(item, dict) and isinstance(item.get("template"), str):
                    templates[str(item.get("name", "default"))] = item["template"]
        legacy = _read_json(path / "chat_template.json").get("chat_template")
        if isinstance(legacy, str):
            templates["default"] = legacy
        jinja_file = path / "chat_template.jinja"
        extra_dir = path / "additional_chat_templates"
        try:
            if jinja_file.is_file():
                templates["default"] = jinja_file.read_text(encoding="utf-8")
            if extra_dir.is_dir():
                for file in sorted(extra_dir.glob("*.jinja")):
                    templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelFormatError(
                f"{path}: chat template not readable ({_first_line(exc)})"
            ) from exc
        return templates

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], name: str | None = None) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its metadata (plain Python values)."""
        model_type = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens) == 0:
            raise ModelFormatError("GGUF metadata has no tokenizer.ggml.tokens (no vocabulary)")
        tokens = [str(t) for t in tokens]
        raw_types = metadata.get("tokenizer.ggml.token_type")
        types = [_NORMAL] * len(tokens) if raw_types is None else [int(t) for t in raw_types]
        if len(types) != len(tokens):
            raise ModelFormatError(
                f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        if model_type == "gpt2":
            backend, add_bos_default = cls._byte_level_backend(metadata, tokens, types), False
        elif model_type == "llama":
            backend, add_bos_default = cls._sentencepiece_backend(metadata, tokens, types), True
        else:
            raise ModelFormatError(
                f"GGUF tokenizer.ggml.model {model_type!r} is not supported "
                "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)"
            )

        # Control tokens are special (skipped on decode); user-defined ones such as <think> are
        # matched whole in text but kept in decoded output, as in the original tokenizer.json.
        specials = [
            AddedToken(tok, special=True, normalized=False)
            for tok, typ in zip(tokens, types, strict=True)
            if typ in (_CONTROL, _UNKNOWN)
        ]
        user_defined = [
            AddedToken(tok, special=False, normalized=False)
            for tok, typ in zip(tokens, types, strict=True)
            if typ == _USER_DEFINED
        ]
        if specials:
            backend.add_special_tokens(specials)
        if user_defined:
            backend.add_tokens(user_defined)

        def token_at(key: str) -> str | None:
            tid = _as_int(metadata.get(f"tokenizer.ggml.{key}"))
            if tid is not None and 0 <= tid < len(tokens):
                return tokens[tid]
            return None

        special_tokens = {
            "bos_token": token_at("bos_token_id"),
            "eos_token": token_at("eos_token_id"),
            "unk_token": token_at("unknown_token_id"),
            "sep_token": token_at("seperator_token_id"),  # llama.cpp's spelling
            "pad_token": token_at("padding_token_id"),
            "cls_token": token_at("cls_token_id"),
            "mask_token": token_at("mask_token_id"),
        }
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        cls._set_post_processor(
            backend,
            special_tokens["bos_token"] if add_bos else None,
            special_tokens["eos_token"] if add_eos else None,
        )

        extra_eos = [
            tid
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if (tid := _as_int(metadata.get(key))) is not None
        ]
        template = metadata.get("tokenizer.chat_template")
        return cls(
            backend,
            name=name or str(metadata.get("general.name") or "GGUF model"),
            special_tokens=special_tokens,
            eos_token_ids=extra_eos,
            chat_templates={"default": template} if isinstance(template, str) else {},
            # The embedding has one row per GGUF token even if two tokens share a spelling.
            vocab_size=len(tokens),
        )

    @staticmethod
    def _byte_level_backend(
        metadata: dict[str, Any], tokens: list[str], types: list[int]
    ) -> tokenizers.Tokenizer:
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
            key = tok
            # A normal token outside the byte alphabet is raw text; BPE needs its byte spelling.
            if typ not in (_CONTROL, _USER_DEFINED, _UNKNOWN) and not set(tok) <= alphabet:
                key = "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab.setdefault(key, i)
        raw_merges = metadata.get("tokenizer.ggml.merges")
        if raw_merges is None or len(raw_merges) == 0:
            raise ModelFormatError("GGUF byte-level tokenizer has no tokenizer.ggml.merges")

        pre_name = str(metadata.get("tokenizer.ggml.pre") or "default")
        pre = _BYTE_LEVEL_PRE.get(pre_name, _ByteLevelPre())
        backend = tokenizers.Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=_parse_merges(raw_merges),
                fuse_unk=False,
                byte_fallback=False,
                ignore_merges=pre.ignore_merges,
            )
        )
        if pre.nfc:
            backend.normalizer = normalizers.NFC()
        if pre.split is not None:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(pre.split), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        elif pre.individual_digits:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        return backend

    @staticmethod
    def _sentencepiece_backend(
        metadata: dict[str, Any], tokens: list[str], types: list[int]
    ) -> tokenizers.Tokenizer:
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        raw_merges = metadata.get("tokenizer.ggml.merges")
        if raw_merges is not None and len(raw_merges) > 0:
            merges = _parse_merges(raw_merges)
        else:
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise ModelFormatError(
                    "GGUF SentencePiece tokenizer has neither tokenizer.ggml.merges nor one "
                    "tokenizer.ggml.scores entry per token"
                )
            merges = _merges_from_scores(tokens, [float(s) for s in scores])
        unk_id = _as_int(metadata.get("tokenizer.ggml.unknown_token_id"))
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        backend = tokenizers.Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                unk_token=unk,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        add_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        # "first": only the start of the text gets the SentencePiece "▁", not text after a special
        # token, matching llama.cpp and transformers' non-legacy Llama tokenizer.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_space else "never", split=False
        )
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(steps)
        return backend

    @staticmethod
    def _set_post_processor(
        backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
    ) -> None:
        single, specials = "$A:0", []
        if bos is not None:
            single = f"{bos}:0 {single}"
            specials.append((bos, backend.token_to_id(bos)))
        if eos is not None:
            single = f"{single} {eos}:0"
            specials.append((eos, backend.token_to_id(eos)))
        if specials:
            backend.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=list(dict.fromkeys(specials))
            )

    def special_token(self, name: str) -> str | None:
        """A special token by its Hugging Face name (bos_token, unk_token, pad_token, ...)."""
        return self._special_tokens.get(name)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text are parsed as special.
        `add_special_tokens` adds what the tokenizer puts around a text (BOS if add_bos_token)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for. A byte-level token may hold part of a multi-byte
        character, which decode() turns into U+FFFD; these are its real bytes (OpenAI's
        logprobs `bytes`), so consecutive tokens' bytes join into the text's UTF-8."""
        piece = self.id_to_token(token_id)
        if piece is None:
            return b""
        decoder = _byte_decoder()
        if piece and all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        byte_fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece
        if byte_fallback:
            return bytes([int(byte_fallback.group(1), 16)])
        return self.decode([token_id]).encode("utf-8")

    @property
    def fim_tokens(self) -> FimTokens | None:
        """The fill-in-the-middle tokens of the first convention whose three tokens are all in
        the vocabulary, or None for a model that has none (most chat models)."""
        for prefix, suffix, middle, end in _FIM_CONVENTIONS:
            ids = [self.token_to_id(t) for t in (prefix, suffix, middle)]
            if all(i is not None for i in ids):
                end_id = self.token_to_id(end)
                return FimTokens(*ids, end=() if end_id is None else (end_id,))  # type: ignore[arg-type]
        return None

    def encode_fim(self, prefix: str | Sequence[int], suffix: str) -> list[int]:
        """The prompt asking a code model for what goes between `prefix` (text, or token ids
        used as they are) and `suffix`: BOS if the model adds one, then prefix, suffix, middle.
        SoraiError (param "suffix") for a model without fill-in-the-middle tokens."""
        fim = self.fim_tokens
        if fim is None:
            raise SoraiError(
                f"model {self.name} has no fill-in-the-middle tokens (StarCoder's <fim_prefix>, "
                "<fim_suffix>, <fim_middle>, Qwen2.5-Coder's <|fim_prefix|>..., or CodeLlama's "
                "<PRE> <SUF> <MID>), so it cannot complete text before a suffix; serve a code "
                "model that has them, or send no suffix",
                param="suffix",
            )
        if isinstance(prefix, str):
            bos = self.bos_token_id
            head = [bos] if self.add_bos_token and bos is not None else []
            prefix_ids = head + [fim.prefix] + self.encode(prefix)
        else:
            prefix_ids = [fim.prefix, *prefix]
        return prefix_ids + [fim.suffix] + self.encode(suffix) + [fim.middle]

    @property
    def renders_tools(self) -> bool:
        """True when the chat template renders tool definitions, calls and results itself (a
        "tool_use" template, or one that mentions `tools`); sorai/model/chat.py falls back to
        writing them as plain messages otherwise."""
        if "tool_use" in self._chat_templates:
            return True
        return any(_TOOLS_VARIABLE.search(t) for t in self._chat_templates.values())

    def _template_for(self, tools: list[dict] | None) -> jinja2.Template:
        if tools is not None and "tool_use" in self._chat_templates:
            key = "tool_use"
        elif "default" in self._chat_templates:
            key = "default"
        else:
            raise SoraiError(f"model {self.name} has no chat template; use generate without --chat")
        if key not in self._compiled:
            try:
                self._compiled[key] = _make_jinja_env().from_string(self._chat_templates[key])
            except jinja2.TemplateSyntaxError as exc:
                raise ModelFormatError(
                    f"model {self.name}: chat template {key!r} is not valid Jinja "
                    f"(line {exc.lineno}: {exc.message})"
                ) from exc
        return self._compiled[key]

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers does."""
        if isinstance(messages, (str, bytes)) or not all(isinstance(m, dict) for m in messages):
            raise SoraiError(
                'messages must be a list of {"role": ..., "content": ...} dicts, '
                f"got {messages!r:.60}"
            )
        template = self._template_for(tools)
        if self.image_text:
            messages = [_with_typed_parts(m, self.image_text) for m in messages]
        variables: dict[str, Any] = dict(self._special_tokens)
        variables.update(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
        variables.update(extra)
        try:
            return template.render(**variables)
        except jinja2.TemplateError as exc:
            raise SoraiError(
                f"model {self.name}: chat template failed to render ({_first_line(exc)})"
            ) from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            # Templates do string arithmetic on message fields: a non-string content lands here.
            raise SoraiError(
                f"model {self.name}: chat template could not render these messages "
                f"({type(exc).__name__}: {_first_line(exc)}); each message needs a string "
                "'role' and a string 'content'"
            ) from exc

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> list[int]:
        """Ids of the rendered chat. No BOS is added: templates write it themselves, and
        transformers likewise encodes the rendered text with add_special_tokens=False."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **extra)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, never emitting a broken UTF-8 character
    (e.g. a Japanese char split over byte-level tokens)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = [t for t in prompt_ids if not self._skipped(t)][-_PROMPT_CONTEXT_TOKENS:]
        # _window[:_read] was already emitted and is decoded only as context, so merges and
        # SentencePiece's leading-space handling of the next tokens come out right.
        self._window: list[int] = context
        self._read = len(context)
        self._prefix_text = self._decode(context)
        self._pieces: list[str] = []

    def _skipped(self, token_id: int) -> bool:
        return self._skip_special and token_id in self._tokenizer.special_ids

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the text it completed (may be "")."""
        if self._skipped(token_id):
            # Decodes to nothing; keeping it out of the window keeps the window bounded.
            return ""
        self._window.append(token_id)
        new_text = self._decode(self._window)
        pending = len(self._window) - self._read
        complete = len(new_text) > len(self._prefix_text) and not new_text.endswith("\ufffd")
        if not complete and pending < _MAX_PENDING_TOKENS:
            return ""
        return self._emit(new_text)

    def _emit(self, new_text: str) -> str:
        piece = new_text[len(self._prefix_text) :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """Whatever text is still held back at the end of the stream, less the bytes of a
        character the stream ended inside (max_tokens or a stop cut it): they would decode to
        U+FFFD, so they are dropped, as vLLM does."""
        if len(self._window) == self._read:
            return ""
        text = self._decode(self._window)
        complete = text.rstrip("\ufffd")
        if len(complete) < len(self._prefix_text):
            complete = self._prefix_text
        return self._emit(complete)
