"""Tools: typed Python functions the agent may call, and the registry that holds them.

A tool's JSON-schema parameters come from its signature (a pydantic model built from the type
hints and defaults; `Annotated[int, Field(description=...)]` adds descriptions), its description
from the docstring's first paragraph. Calls are validated against that model, run with a time
limit, and never raise: a bad argument, an exception or a timeout becomes the text the model
sees as the Observation.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import pydantic

from sorai.errors import SoraiError

DEFAULT_TIMEOUT = 30.0
MAX_OBSERVATION = 4000  # characters of a tool's output (or error) the model gets back
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI's API accepts as a function name


class ToolFailure(Exception):
    """A tool's way to fail with a message meant for the model (no exception type shown)."""


@dataclass
class ToolResult:
    ok: bool
    output: str  # what the model sees: the result, or the error
    seconds: float


@dataclass
class Tool:
    """A function the model can call. `parameters` is the JSON schema of its arguments."""

    name: str
    description: str
    fn: Callable[..., Any]
    arguments: type[pydantic.BaseModel]
    timeout: float = DEFAULT_TIMEOUT
    # Narrows the schema sent with each request to what holds now (the image tools list the
    # workspace's images as an enum, so guided decoding can only name a file that exists).
    refine: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    parameters: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise SoraiError(
                f"tool name {self.name!r}: APIs take 1-64 letters, digits, '_' or '-' (name it "
                "with tool(fn, name=...))"
            )
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        schema["additionalProperties"] = False
        self.parameters = schema

    def definition(self) -> dict[str, Any]:
        """OpenAI's {"type": "function", "function": {...}}."""
        parameters = self.parameters
        if self.refine is not None:
            parameters = self.refine(copy.deepcopy(parameters))
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": parameters,
            },
        }

    def signature(self) -> str:
        """`name(arg: type, ...)`: how the ReAct prompt lists the tool."""
        props = self.parameters.get("properties", {})
        args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in props.items())
        return f"{self.name}({args})"

    def coerce(self, value: Any) -> dict[str, Any]:
        """Arguments as an object: a bare value is taken as the only (required) parameter,
        which is what models write for one-argument tools ("Action Input: 2 + 2")."""
        if isinstance(value, dict):
            return value
        names = list(self.parameters.get("properties", {}))
        required = self.parameters.get("required", [])
        if len(required) == 1 or len(names) == 1:
            return {(required or names)[0]: value}
        raise ToolFailure(f"{self.name} takes an object of arguments: {', '.join(names)}")

    def __call__(self, arguments: Any = None, timeout: float | None = None) -> ToolResult:
        started = time.monotonic()
        limit = self.timeout if timeout is None else timeout
        try:
            valid = self.arguments.model_validate(self.coerce(arguments or {}))
            # The validated values themselves (a model_dump() would turn a pydantic-model or
            # dataclass parameter into a dict).
            values = {name: getattr(valid, name) for name in type(valid).model_fields}
            output = _run_with_timeout(self.fn, values, limit)
        except pydantic.ValidationError as e:
            message = f"invalid arguments for {self.name}: {_errors(e)}"
            return ToolResult(False, _bounded(message), 0.0)
        except TimeoutError:
            message = f"{self.name} timed out after {limit:g} s"
            return ToolResult(False, message, time.monotonic() - started)
        except (ToolFailure, SoraiError) as e:
            message = f"{self.name} failed: {e}"
            return ToolResult(False, _bounded(message), time.monotonic() - started)
        except SystemExit as e:  # sys.exit() in a tool ends the tool, not the agent
            message = f"{self.name} exited (code {e.code})"
            return ToolResult(False, message, time.monotonic() - started)
        except Exception as e:  # a tool's bug is the model's observation, not the run's end
            message = f"{self.name} raised {type(e).__name__}: {e}"
            return ToolResult(False, _bounded(message), time.monotonic() - started)
        return ToolResult(True, _text(output), time.monotonic() - started)


def _errors(error: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in error.errors()
    )


def _plain(value: Any) -> Any:
    """A JSON-able stand-in for what json cannot write: dataclasses and pydantic models as
    their fields, arrays as lists, bytes and images described, sets as lists, the rest str()."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return value.tolist()
    if hasattr(value, "mode") and hasattr(value, "size") and hasattr(value, "getpixel"):
        return f"<image {value.size[0]}x{value.size[1]} {value.mode}>"  # PIL, not imported
    return str(value)


def _text(output: Any) -> str:
    if isinstance(output, str):
        text = output
    elif isinstance(output, (bytes, bytearray)):
        text = _plain(output)
    else:
        text = json.dumps(output, ensure_ascii=False, default=_plain)
    return _bounded(text)


def _bounded(text: str) -> str:
    if len(text) > MAX_OBSERVATION:
        text = text[:MAX_OBSERVATION] + f"… [{len(text) - MAX_OBSERVATION} more characters cut]"
    return text


def _run_with_timeout(fn: Callable[..., Any], values: dict[str, Any], limit: float) -> Any:
    # A daemon thread per call: Python cannot kill a thread, so a sync tool that overruns keeps
    # running in the background with its result dropped; tools that can hang on purpose (the
    # python tool) enforce their own limit on a process. Async tools are cancelled properly.
    box: dict[str, Any] = {}
    positional = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_ONLY
    ]
    args = [values.pop(name) for name in positional]
    kwargs = values

    def target() -> None:
        try:
            if inspect.iscoroutinefunction(fn):
                box["value"] = asyncio.run(asyncio.wait_for(fn(*args, **kwargs), limit))
            else:
                box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="sorai-agent-tool")
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        raise TimeoutError
    if "error" in box:
        if isinstance(box["error"], asyncio.TimeoutError):
            raise TimeoutError
        raise box["error"]
    return box.get("value")


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    first = _SECTION.split(doc.split("\n\n")[0])[0]
    return " ".join(first.split()) or fn.__name__.replace("_", " ")


_SECTION = re.compile(r"(?m)^\s*(?:Args|Arguments|Parameters|Returns|Raises)\s*:?\s*$|^\s*:param ")
_GOOGLE_ARG = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_REST_ARG = re.compile(r"^:param\s+(?:[\w\[\], ]+\s+)?(\w+)\s*:\s*(.*)$")


def _parameter_docs(fn: Callable[..., Any]) -> dict[str, str]:
    """Parameter descriptions from a docstring's Google-style `Args:` section (`name (type):
    text`, continued on indented lines) or reST `:param name: text` lines."""
    docs: dict[str, str] = {}
    current = None
    in_args = False
    for line in (inspect.getdoc(fn) or "").splitlines():
        stripped = line.strip()
        rest = _REST_ARG.match(stripped)
        if rest:
            current = rest.group(1)
            docs[current] = rest.group(2)
            continue
        if re.fullmatch(r"(Args|Arguments|Parameters)\s*:?", stripped):
            in_args, current = True, None
            continue
        if not in_args and not (current and line.startswith((" ", "\t")) and stripped):
            current = None
            continue
        if in_args and stripped and not line.startswith((" ", "\t")):
            in_args, current = False, None  # the section ended (a new heading or paragraph)
            continue
        google = _GOOGLE_ARG.match(stripped) if in_args else None
        if google and (line.startswith((" ", "\t")) and len(line) - len(line.lstrip()) <= 4):
            current = google.group(1).lstrip("*")
            docs[current] = google.group(2)
        elif current and stripped:
            docs[current] += " " + stripped
    return {name: " ".join(text.split()) for name, text in docs.items() if text.strip()}


def _described(hint: Any, text: str | None) -> Any:
    """`hint` with the docstring's description, which an explicit Field(description=) in an
    Annotated hint still overrides (its metadata comes later)."""
    if not text:
        return hint
    if get_origin(hint) is Annotated:
        base, *metadata = get_args(hint)
        return Annotated[(base, pydantic.Field(description=text), *metadata)]
    return Annotated[hint, pydantic.Field(description=text)]


def arguments_model(fn: Callable[..., Any], name: str) -> type[pydantic.BaseModel]:
    """A pydantic model of `fn`'s parameters (every one typed; *args/**kwargs refused)."""
    try:
        hints = get_type_hints(fn, include_extras=True)
    except NameError as e:  # string annotations name a type only the defining scope knew
        raise SoraiError(
            f"tool {name}: cannot resolve its type hints ({e}); import the types they use at "
            "module level"
        ) from None
    fields: dict[str, Any] = {}
    docs = _parameter_docs(fn)
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise SoraiError(f"tool {name}: *args and **kwargs cannot be described to a model")
        if param.name not in hints:
            raise SoraiError(f"tool {name}: parameter {param.name!r} has no type hint")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (_described(hints[param.name], docs.get(param.name)), default)
    return pydantic.create_model(
        f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields
    )


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """Make a Tool of a typed function; usable bare (`@tool`) or with options."""

    def make(f: Callable[..., Any]) -> Tool:
        tool_name = name or f.__name__
        return Tool(
            tool_name, description or _description(f), f, arguments_model(f, tool_name), timeout
        )

    return make(fn) if fn is not None else make


class Toolbox:
    """The tools an agent may use, by name."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, item: Tool | Callable[..., Any]) -> Tool:
        t = item if isinstance(item, Tool) else tool(item)
        if t.name in self._tools:
            raise SoraiError(f"two tools are named {t.name!r}")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def call(self, name: str, arguments: Any) -> ToolResult:
        """Run a tool by name; an unknown name is answered with the valid ones."""
        t = self._tools.get(name)
        if t is None:
            return ToolResult(
                False, f"there is no tool {name!r}; the tools are: {', '.join(self.names)}", 0.0
            )
        return t(arguments)
