"""The LLM judge: prompt files, the {reason, score} answer decoded under a JSON schema, and
ragas-style faithfulness.

A prompt is a Jinja2 template file with a `[system]` and a `[user]` section (each a line of its
own; `system:` / `user:` and a YAML front matter, as in Azure's .prompty files, work too; a
file without sections is all user message); it sees the row's fields `query`, `context`,
`response`, `ground_truth` as text, and nothing else (a prompt using another name fails when it
is loaded, naming its file). The
built-in prompts live in `sorai/apps/eval/prompts/`; `--prompts DIR` puts a file of the same
name in front of them. The judge's answer is decoded under SCORE_SCHEMA, so even a small model
answers an object that parses, with an integer score in range; `reason` comes first in the
schema so the model writes its reasoning before it commits to a score.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.meta

from sorai.errors import SoraiError

REASON_CHARS = 300  # the schema's maxLength: a judge cannot ramble past the token budget
MAX_TOKENS = 600
# A section starts at a line `[system]` / `[user]`; in a .prompty (a file with YAML front
# matter) at a line `system:` / `user:`, which elsewhere may well be a prompt's own text.
_SECTION = re.compile(r"^[ \t]*\[(system|user)\][ \t]*$", re.MULTILINE | re.IGNORECASE)
_PROMPTY_SECTION = re.compile(r"^[ \t]*(system|user):[ \t]*$", re.MULTILINE | re.IGNORECASE)
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n.*?\n---[ \t]*\n", re.DOTALL)  # a .prompty's YAML
FIELDS = ("query", "context", "response", "ground_truth")
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)


class JudgeError(SoraiError):
    """A judge answer that cannot be used (a score out of range from a non-strict endpoint)."""


class ChatJSON(Protocol):
    """What the judge needs of `sorai.apps.client.Client`."""

    model: str

    def chat_json(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], name: str = ..., **kw: Any
    ) -> Any: ...


def score_schema(low: int = 1, high: int = 5) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": REASON_CHARS},
            "score": {"type": "integer", "enum": list(range(low, high + 1))},
        },
        "required": ["reason", "score"],
        "additionalProperties": False,
    }


SCORE_SCHEMA = score_schema()


@dataclass(frozen=True)
class Prompt:
    name: str
    path: str
    text: str

    @property
    def digest(self) -> str:
        """What the result cache keys on: an edited prompt is judged afresh."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def body(self) -> str:
        """The text without a .prompty's YAML front matter (its model settings are not
        used: the judge is the command line's)."""
        return _FRONT_MATTER.sub("", self.text, count=1)

    def sections(self) -> tuple[str, str]:
        """(system, user). A file without section lines is all user message."""
        body = self.body
        prompty = body != self.text and not _SECTION.search(body)
        parts = (_PROMPTY_SECTION if prompty else _SECTION).split(body)
        if len(parts) == 1:
            return "", parts[0].strip()
        found = {k.lower(): v.strip() for k, v in zip(parts[1::2], parts[2::2], strict=True)}
        if "user" not in found:
            raise SoraiError(f"{self.path}: no [user] section (a prompt is [system] then [user])")
        return found.get("system", ""), found["user"]

    def variables(self) -> set[str]:
        """The fields the template uses (so a custom prompt's needs are known)."""
        try:
            found = jinja2.meta.find_undeclared_variables(_ENV.parse(self.body))
        except jinja2.TemplateSyntaxError as e:
            raise SoraiError(f"{self.path}:{e.lineno}: {e.message}") from None
        return found - set(_ENV.globals)

    def check(self, also: tuple[str, ...] = ()) -> Prompt:
        """Fail now, naming the file, on a prompt every row would fail on: no [user] section,
        a syntax error, or a variable the judge is not given (e.g. `{{ question }}`)."""
        self.sections()
        unknown = sorted(self.variables() - set(FIELDS) - set(also))
        if unknown:
            used = ", ".join("{{ " + v + " }}" for v in unknown)
            raise SoraiError(f"{self.path}: uses {used}; a prompt sees {', '.join(FIELDS + also)}")
        return self

    def render(self, **values: Any) -> list[dict[str, str]]:
        system, user = self.sections()
        messages = []
        try:
            if system:
                messages.append(
                    {"role": "system", "content": _ENV.from_string(system).render(**values)}
                )
            messages.append({"role": "user", "content": _ENV.from_string(user).render(**values)})
        except jinja2.TemplateError as e:
            raise SoraiError(f"{self.path}: {e}") from None
        return messages


def load_prompt(name: str, prompts_dir: str | None = None) -> Prompt:
    """The prompt `name` (e.g. "groundedness"): `prompts_dir/name.md` when it exists, else the
    built-in one."""
    if prompts_dir:
        path = Path(prompts_dir) / f"{name}.md"
        if path.is_file():
            also = ("statements",) if name == "faithfulness_verdicts" else ()
            also = ("claim",) if name.endswith("_claim") else also
            return read_prompt(str(path), name, also)
    resource = resources.files("sorai.apps.eval").joinpath("prompts", f"{name}.md")
    if not resource.is_file():
        raise SoraiError(f"no prompt {name!r}")
    return Prompt(name, f"<built-in>/{name}.md", resource.read_text(encoding="utf-8"))


def read_prompt(path: str, name: str | None = None, also: tuple[str, ...] = ()) -> Prompt:
    """A prompt file given by path (a custom judge evaluator)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise SoraiError(f"cannot read prompt {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SoraiError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    return Prompt(name or Path(path).stem, path, text).check(also)


@dataclass
class Verdict:
    score: float
    reason: str


def judge(
    client: ChatJSON, prompt: Prompt, values: dict[str, Any], max_tokens: int = MAX_TOKENS
) -> Verdict:
    """One {reason, score} judgement, the score an integer 1-5."""
    answer = client.chat_json(
        prompt.render(**values),
        SCORE_SCHEMA,
        name="judgement",
        temperature=0,
        max_tokens=max_tokens,
    )
    score = answer.get("score") if isinstance(answer, dict) else None
    if isinstance(score, str) and re.fullmatch(r"\s*[1-5](\.0*)?\s*", score):
        score = float(score)  # "4": an endpoint that does not enforce the schema's types
    if isinstance(score, bool) or not isinstance(score, int | float) or not 1 <= score <= 5:
        raise JudgeError(f"the judge answered no score in 1-5: {str(answer)[:200]}")
    return Verdict(float(score), str(answer.get("reason", "")).strip())


MAX_STATEMENTS = 12

STATEMENTS_SCHEMA = {
    "type": "object",
    "properties": {
        "statements": {
            "type": "array",
            "items": {"type": "string", "maxLength": 200},
            "minItems": 1,
            "maxItems": MAX_STATEMENTS,
        }
    },
    "required": ["statements"],
    "additionalProperties": False,
}


def verdicts_schema(count: int) -> dict[str, Any]:
    # Exactly one verdict per statement: the schema fixes the count so none is skipped.
    return {
        "type": "object",
        "properties": {
            "verdicts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "reason": {"type": "string", "maxLength": 200},
                        "supported": {"type": "boolean"},
                    },
                    "required": ["reason", "supported"],
                    "additionalProperties": False,
                },
                "minItems": count,
                "maxItems": count,
            }
        },
        "required": ["verdicts"],
        "additionalProperties": False,
    }


def faithfulness(
    client: ChatJSON,
    statements_prompt: Prompt,
    verdicts_prompt: Prompt,
    values: dict[str, Any],
    max_tokens: int = MAX_TOKENS,
) -> Verdict:
    """ragas-style faithfulness: the response split into statements, each judged against the
    context; score = supported / all (0-1); reason = the statements not supported."""
    answer = client.chat_json(
        statements_prompt.render(**values),
        STATEMENTS_SCHEMA,
        name="statements",
        temperature=0,
        max_tokens=max_tokens,
    )
    statements = [s.strip() for s in (answer or {}).get("statements", []) if str(s).strip()]
    if not statements:
        raise JudgeError("the judge found no statements in the response")
    answer = client.chat_json(
        verdicts_prompt.render(**values, statements=statements),
        verdicts_schema(len(statements)),
        name="verdicts",
        temperature=0,
        max_tokens=max_tokens + 150 * len(statements),
    )
    verdicts = (answer or {}).get("verdicts", [])
    if len(verdicts) != len(statements):
        raise JudgeError(f"{len(statements)} statements but {len(verdicts)} verdicts")
    supported = [bool(v.get("supported")) for v in verdicts]
    unsupported = [s for s, ok in zip(statements, supported, strict=True) if not ok]
    reason = f"{sum(supported)} of {len(statements)} statements supported" + (
        f"; not supported: {'; '.join(unsupported)}" if unsupported else ""
    )
    return Verdict(sum(supported) / len(statements), reason)
