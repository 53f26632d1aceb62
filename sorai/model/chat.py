"""The one chat renderer: OpenAI-shaped messages (and tools) -> the prompt, and answers -> calls.

Serving (/v1/chat/completions, `LLM.chat`) and training (`sorai train`, sorai/train/data.py) both
build their prompts here, so a conversation is the same token ids in both.

Protocol-independent: tools, tool_choice and messages are OpenAI-shaped plain dicts, calls come
back as OpenAI-shaped dicts, and bad input raises ToolError naming the field at fault (its
`param`, e.g. "tools.0.function.name"). The model's tokenizer applies its chat template
(sorai/model/tokenizer.py); this module decides which messages and tool definitions go into it.
sorai/engine/tools.py adds the constraint of a forced call (a GuidedSpec) on top, and the
server (sorai/server/tools.py) wraps that in its protocol types and streams.

Messages are normalised first (check_messages): content is a string or a list of text parts,
joined with "\n" (as vLLM does for text-only models); "developer" becomes "system"; an assistant
turn may carry `tool_calls` (its content may then be null) and a "tool" turn needs the
`tool_call_id` it answers.

A request's `tools` and `tool_choice` become a ToolChoice, which

- renders the conversation (render, encode): with the model's own chat template when that
  template knows tools (Tokenizer.renders_tools: it mentions `tools`), else with the fallback
  below; with no tools at all, the same path renders the plain messages;
- gives, when a call is required (tool_choice "required" or a named function), the JSON schema
  over {"name": ..., "arguments": ...} the answer is generated under (call_schema);
- turns the generated text into content and tool calls (answer()).

The fallback, for templates without tool support (the default SmolLM2 model's):
  * the tool definitions go into the system message (appended to the first one, or a new
    one in front): one JSON line {"name", "description", "parameters"} per tool, then the
    instruction to answer with only {"name": <function name>, "arguments": {...}};
  * an assistant turn with tool_calls becomes assistant content: its text, then one such JSON
    object per call, one per line;
  * a tool turn becomes a user turn "Result of <name> (call <id>): <content>"; consecutive
    results are joined, one per line, into one user turn.
With tool_choice "auto" the output is parsed for a call: a JSON object with "name" (a known
tool) and "arguments" (an object, or a JSON text of one), possibly inside <tool_call> tags or
a ```json fence and after some text; without one the output is plain content.

Training renders a record as the server renders a request of its messages and `tools` (with
no tool_choice), so a fine-tune learns to call tools in the format it is later prompted with,
and an assistant turn that calls a tool is trained on its calls' text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from sorai.errors import ToolError

if TYPE_CHECKING:
    from sorai.model.tokenizer import Tokenizer

# OpenAI's rule for function names (letters, digits, _ and -, at most 64), plus "." and ":"
# which MCP-style names use.
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # the JSON schema of the arguments, an object schema

    def definition(self) -> dict[str, Any]:
        """OpenAI's {"type": "function", "function": {...}}, as chat templates expect it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def call_schema(self) -> dict[str, Any]:
        """The schema of one call of this tool: {"name": <this name>, "arguments": {...}}."""
        return {
            "type": "object",
            "properties": {"name": {"const": self.name}, "arguments": self.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }


def _parse_tool(i: int, item: Any) -> Tool:
    where = f"tools.{i}"
    if not isinstance(item, Mapping):
        raise ToolError(
            f'{where} must be an object {{"type": "function", "function": {{...}}}}', param=where
        )
    kind = item.get("type", "function")
    if kind != "function":
        raise ToolError(f"{where}.type must be 'function', got {kind!r:.40}", param=f"{where}.type")
    function = item.get("function")
    if not isinstance(function, Mapping):
        raise ToolError(
            f'{where} needs "function": {{"name": ..., "parameters": {{...}}}}',
            param=f"{where}.function",
        )
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolError(
            f"{where}.function.name must be 1 to 64 letters, digits, '_', '-', '.' or ':', "
            f"got {name!r:.70}",
            param=f"{where}.function.name",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError(
            f"{where}.function.description must be a string",
            param=f"{where}.function.description",
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    object_schema = isinstance(parameters, Mapping) and (
        parameters.get("type", "object") == "object"
    )
    if not object_schema:
        try:
            shown = json.dumps(parameters)
        except (TypeError, ValueError):
            shown = repr(parameters)
        raise ToolError(
            f"{where}.function.parameters must be a JSON schema of an object "
            f'({{"type": "object", "properties": {{...}}}}), got {shown:.80}',
            param=f"{where}.function.parameters",
        )
    parameters = {"type": "object", **parameters} if "type" not in parameters else dict(parameters)
    return Tool(name, description, parameters)


def parse_tools(tools: Any) -> list[Tool]:
    """OpenAI-shaped tool definitions -> Tools (ToolError naming the bad field)."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ToolError("tools must be a list of function definitions", param="tools")
    parsed = [_parse_tool(i, item) for i, item in enumerate(tools)]
    seen: set[str] = set()
    for i, tool in enumerate(parsed):
        if tool.name in seen:
            raise ToolError(
                f"two tools are named {tool.name!r}; names must be unique",
                param=f"tools.{i}.function.name",
            )
        seen.add(tool.name)
    return parsed


# -- the request's tools and tool_choice -----------------------------------------------------


@dataclass(frozen=True)
class ToolChoice:
    """The tools a request offers and how the answer may use them.

    mode: "none" (no tools in the prompt, plain text), "auto" (the model decides; the output
    is parsed), "required" (some call, constrained) or "named" (a call of `name`, constrained).
    """

    tools: tuple[Tool, ...] = ()
    mode: str = "none"
    name: str | None = None
    parallel: bool = True

    @classmethod
    def from_request(
        cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None
    ) -> Self:
        """OpenAI's tools, tool_choice and parallel_tool_calls, checked (ToolError naming the
        bad field). No tool_choice means "auto" with tools and "none" without."""
        parsed = tuple(parse_tools(tools))
        parallel = parallel_tool_calls is not False
        if tool_choice is None:
            return cls(parsed, "auto" if parsed else "none", parallel=parallel)
        if isinstance(tool_choice, str):
            if tool_choice not in TOOL_CHOICES:
                raise ToolError(
                    "tool_choice must be 'none', 'auto', 'required' or "
                    f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r:.40}',
                    param="tool_choice",
                )
            if tool_choice != "none" and not parsed:
                raise ToolError(
                    f"tool_choice {tool_choice!r} needs tools: give 'tools' too",
                    param="tool_choice",
                )
            return cls(parsed, tool_choice, parallel=parallel)
        name = None
        if isinstance(tool_choice, Mapping) and tool_choice.get("type", "function") == "function":
            function = tool_choice.get("function")
            name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            try:
                shown = json.dumps(tool_choice)
            except (TypeError, ValueError):
                shown = repr(tool_choice)
            raise ToolError(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}, '
                f"got {shown:.80}",
                param="tool_choice",
            )
        if not parsed:
            raise ToolError(
                f"tool_choice names the function {name!r} but the request gives no tools",
                param="tool_choice",
            )
        if name not in {t.name for t in parsed}:
            known = ", ".join(repr(t.name) for t in parsed)
            raise ToolError(
                f"tool_choice names the function {name!r}, which is not among the tools ({known})",
                param="tool_choice",
            )
        return cls(parsed, "named", name=name, parallel=parallel)

    @property
    def active(self) -> bool:
        """True when the answer may be a tool call."""
        return self.mode != "none"

    @property
    def forced(self) -> bool:
        """True when the answer must be a call (and the output is constrained to one)."""
        return self.mode in ("required", "named")

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.tools}

    def offered(self) -> tuple[Tool, ...]:
        return self.tools if self.active else ()

    def call_schema(self) -> dict[str, Any] | None:
        """The JSON schema a forced call is generated under (None unless forced)."""
        if self.mode == "named":
            return next(t for t in self.tools if t.name == self.name).call_schema()
        if self.mode == "required":
            schemas = [t.call_schema() for t in self.tools]
            return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return None

    # -- the prompt ---------------------------------------------------------------------------

    def template_input(
        self, tokenizer: Tokenizer, messages: Any
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(messages, tools) for tokenizer.encode_chat, natively or in the fallback format.

        `messages` are OpenAI-shaped dicts (checked here: ToolError naming the bad one)."""
        offered = self.offered()
        if tokenizer.renders_tools:
            definitions = [t.definition() for t in offered] or None
            return native_messages(messages), definitions
        rendered = fallback_messages(messages)
        if offered:
            text = fallback_instructions(offered, self.mode, self.name)
            if rendered and rendered[0]["role"] == "system":
                rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + text}
            else:
                rendered.insert(0, {"role": "system", "content": text})
        return rendered, None

    def render(
        self, tokenizer: Tokenizer, messages: Any, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of `messages` with these tools, as the model's template writes it."""
        rendered, definitions = self.template_input(tokenizer, messages)
        return tokenizer.apply_chat_template(rendered, add_generation_prompt, tools=definitions)

    def encode(
        self, tokenizer: Tokenizer, messages: Any, add_generation_prompt: bool = True
    ) -> list[int]:
        """The token ids of render()'s text (no BOS added: templates write their own)."""
        rendered, definitions = self.template_input(tokenizer, messages)
        return tokenizer.encode_chat(rendered, add_generation_prompt, tools=definitions)

    # -- the answer ---------------------------------------------------------------------------

    def answer(
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
        """(content, tool_calls, finish_reason) of one whole answer; calls in OpenAI's shape."""
        if self.forced:
            found = split_forced(text)
            if found is None:
                return text, None, finish_reason  # cut off (length) before the name
            name, arguments, complete = found
            # A call cut off by max_tokens keeps its partial arguments and "length", as
            # OpenAI's does.
            return None, [new_call(name, arguments)], "tool_calls" if complete else finish_reason
        if self.mode == "auto":
            parsed = parse_calls(text, self.names)
            if parsed is not None:
                content, calls = parsed
                if not self.parallel:
                    calls = calls[:1]
                return content, [new_call(n, a) for n, a in calls], "tool_calls"
        return text, None, finish_reason


def new_call(name: str, arguments: str) -> dict[str, Any]:
    """A call in OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments"}}."""
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- messages --------------------------------------------------------------------------------

_MESSAGE_SHAPE = '{"role": ..., "content": ...} dicts'
_CONTENT_SHAPE = 'a string or a list of text parts ({"type": "text", "text": ...})'


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        # Joined with newlines, as vLLM does for text-only models.
        return "\n".join(p["text"] for p in content)
    raise ToolError(f"{where}.content must be {_CONTENT_SHAPE}, got {content!r:.60}", param=where)


def _call(where: str, call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not isinstance(call.get("id"), str):  # type: ignore[union-attr]
        raise ToolError(
            f'{where} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
            f'"arguments": ...}}}}, got {call!r:.80}',
            param=where,
        )
    arguments = function.get("arguments", "{}")  # type: ignore[union-attr]
    if not isinstance(arguments, (str, Mapping)):
        raise ToolError(f"{where}.function.arguments must be a JSON text or an object", param=where)
    return {
        "id": call["id"],
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-shaped messages -> {"role", "content": text, ["tool_calls"], ["tool_call_id"]}.

    Content parts are joined into one text and "developer" becomes "system" (templates know
    that); a message that is not of this shape raises ToolError naming it."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ToolError(f"messages must be a list of {_MESSAGE_SHAPE}, got {messages!r:.60}")
    checked: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, Mapping):
            raise ToolError(f"messages must be {_MESSAGE_SHAPE}, got {m!r:.60}", param=where)
        role = m.get("role")
        if not isinstance(role, str):
            raise ToolError(f"{where} needs a string 'role', got {role!r:.40}", param=where)
        content = m.get("content")
        if content is None and role != "assistant":
            raise ToolError(f"{where}: a {role} message needs 'content'", param=where)
        message: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": _content_text(content, where),
        }
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ToolError(
                    f"{where}: only an assistant message may have 'tool_calls'", param=where
                )
            if isinstance(calls, (str, Mapping)) or not isinstance(calls, Sequence):
                raise ToolError(f"{where}.tool_calls must be a list of calls", param=where)
            message["tool_calls"] = [
                _call(f"{where}.tool_calls.{j}", c) for j, c in enumerate(calls)
            ]
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ToolError(
                    f"{where}: a tool message needs 'tool_call_id' (the id of the call it answers)",
                    param=where,
                )
            message["tool_call_id"] = call_id
        checked.append(message)
    return checked


def _arguments_value(arguments: Any) -> Any:
    """A call's arguments as an object when they are JSON text of one, else as given."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _call_names(messages: Sequence[dict[str, Any]]) -> dict[str, str]:
    return {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}


def native_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as tool-aware (transformers-style) templates expect them: tool_calls with
    arguments as objects, tool turns with tool_call_id and the function's name."""
    checked = check_messages(messages)
    names = _call_names(checked)
    rendered: list[dict[str, Any]] = []
    for m in checked:
        message = dict(m)
        if "tool_calls" in m:
            message["tool_calls"] = [
                {
                    **c,
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": _arguments_value(c["function"]["arguments"]),
                    },
                }
                for c in m["tool_calls"]
            ]
        if m["role"] == "tool" and m["tool_call_id"] in names:
            message["name"] = names[m["tool_call_id"]]
        rendered.append(message)
    return rendered


def call_text(name: str, arguments: Any) -> str:
    """One call as the fallback format writes it."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def fallback_messages(messages: Any) -> list[dict[str, str]]:
    """Messages for a template without tool support: calls as assistant text, results as
    user turns (see the module's docstring)."""
    checked = check_messages(messages)
    names = _call_names(checked)
    rendered: list[dict[str, str]] = []
    results_at: int | None = None  # index of the user turn collecting consecutive results
    for m in checked:
        if m["role"] == "tool":
            call_id = m["tool_call_id"]
            name = names.get(call_id)
            where = f"{name} (call {call_id})" if name else f"call {call_id}"
            line = f"Result of {where}: {m['content']}"
            if results_at is not None:
                previous = rendered[results_at]["content"]
                rendered[results_at] = {"role": "user", "content": previous + "\n" + line}
            else:
                results_at = len(rendered)
                rendered.append({"role": "user", "content": line})
            continue
        results_at = None
        text = m["content"]
        if m.get("tool_calls"):
            calls = "\n".join(
                call_text(c["function"]["name"], _arguments_value(c["function"]["arguments"]))
                for c in m["tool_calls"]
            )
            text = f"{text}\n{calls}" if text else calls
        rendered.append({"role": m["role"], "content": text})
    return rendered


def fallback_instructions(tools: Sequence[Tool], mode: str, name: str | None) -> str:
    """The system-message text that offers `tools` to a model whose template cannot."""
    lines = [
        "You can call these functions (one per line: its name, what it does and the JSON "
        "schema of its arguments):"
    ]
    for tool in tools:
        definition: dict[str, Any] = {"name": tool.name}
        if tool.description:
            definition["description"] = tool.description
        definition["parameters"] = tool.parameters
        lines.append(json.dumps(definition, ensure_ascii=False))
    shape = '{"name": <function name>, "arguments": <an object of its arguments>}'
    if mode == "named":
        lines.append(
            f"You must call the function {name}: answer with only a JSON object "
            f'{{"name": "{name}", "arguments": <an object of its arguments>}}.'
        )
    elif mode == "required":
        lines.append(f"You must call one of them: answer with only a JSON object {shape}.")
    else:
        lines.append(
            f"To call a function, answer with only a JSON object {shape}. "
            "If no function is needed, or once you have the results you need, answer in plain "
            "text."
        )
    return "\n".join(lines)


# -- parsing ---------------------------------------------------------------------------------

# The start of a forced call as guided decoding writes it: {"name":"<name>","arguments":
_FORCED_PREFIX = re.compile(r'^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_CLOSING = re.compile(r"\s*\}?\s*$")
_OPENERS = re.compile(r"[\[{]")
# Wrappers models put around a call, stripped from the text before it.
_TRAILING_MARKERS = re.compile(r"(?:\s*(?:<tool_call>|<\|?tool_calls?\|?>|```(?:json)?))+\s*$")
_WRAPPER_KEYS = ("function", "tool_call", "function_call")


def split_forced(text: str) -> tuple[str, str, bool] | None:
    """(name, arguments text, complete) of a forced call; None before the name is complete.

    The arguments text is the model's own (the call minus its wrapper), so the streamed
    fragments and the whole answer agree. complete: the call's JSON ended and parses.
    """
    match = _FORCED_PREFIX.match(text)
    if match is None:
        return None
    name = json.loads(match.group(1))
    rest = text[match.end() :].rstrip()
    complete = rest.endswith("}")
    arguments = rest[:-1].rstrip() if complete else rest
    if complete:
        try:
            complete = isinstance(json.loads(arguments), dict)
        except json.JSONDecodeError:
            complete = False
    return name, arguments, complete


def pending_arguments(text: str) -> str | None:
    """The arguments text of a forced call still being generated, less what may be the call's
    closing brace; None before the name is complete."""
    match = _FORCED_PREFIX.match(text)
    if match is None:
        return None
    rest = text[match.end() :]
    closing = _CLOSING.search(rest)
    return rest[: closing.start() if closing else len(rest)]


def _as_calls(value: Any, names: set[str]) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] when `value` is a call (or a list of calls) of known tools."""
    if isinstance(value, list):
        calls: list[tuple[str, str]] = []
        for item in value:
            found = _as_calls(item, names)
            if not found:
                return None
            calls += found
        return calls or None
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str):
        # {"function": {...}}, {"tool_call": {...}}, OpenAI's {"type": "function", ...}
        inner = [value[k] for k in _WRAPPER_KEYS if isinstance(value.get(k), dict)]
        return _as_calls(inner[0], names) if len(inner) == 1 else None
    if name not in names:
        return None
    if "arguments" in value:
        arguments = value["arguments"]
    elif "parameters" in value:  # Llama 3's spelling
        arguments = value["parameters"]
    elif set(value) <= {"name", "type", "id"}:
        arguments = {}
    else:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return [(name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))]


def parse_calls(text: str, names: set[str]) -> tuple[str | None, list[tuple[str, str]]] | None:
    """(content before the first call or None, [(name, arguments JSON)]), or None when the
    text calls no known tool. Looks at every JSON object or array in the text."""
    decoder = json.JSONDecoder()
    calls: list[tuple[str, str]] = []
    first: int | None = None
    position = 0
    while (match := _OPENERS.search(text, position)) is not None:
        start = match.start()
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            position = start + 1
            continue
        found = _as_calls(value, names)
        if found:
            calls += found
            first = start if first is None else first
        position = end
    if first is None:
        return None
    content = _TRAILING_MARKERS.sub("", text[:first]).rstrip()
    return content or None, calls
