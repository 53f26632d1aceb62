"""A request's tools at the engine: the chat renderer's ToolChoice plus a forced call's GuidedSpec.

The prompt, the fallback format and parsing calls out of the output live in sorai/model/chat.py
(see its docstring); this adds only what needs the engine's request parameters: a forced call
(tool_choice "required" or a named function) becomes a JSON-schema GuidedSpec whose argument
objects are closed (only declared properties, as OpenAI's strict mode) unless the tool says
`"strict": false`; with "auto", an answer that starts as a JSON object is held to the same
call schemas (a grammar: a call, or text that does not start with `{`). `LLM.chat` uses it
directly; the server (sorai/server/tools.py) wraps it in its protocol types.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from sorai.engine.guided.compile import TOOL_CALL_OR_TEXT
from sorai.engine.guided.schema import close_objects
from sorai.engine.params import GuidedSpec
from sorai.errors import ToolError
from sorai.model.chat import ToolChoice


@dataclass(frozen=True)
class ToolSetup(ToolChoice):
    """ToolChoice (from_request, active, forced, encode, answer, ...) with the constraint its
    forced calls are generated under."""

    open_tools: frozenset[str] = frozenset()  # tools given with "strict": false

    @classmethod
    def from_request(
        cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None
    ) -> Self:
        setup = super().from_request(tools, tool_choice, parallel_tool_calls)
        open_tools = frozenset(
            t["function"].get("name")
            for t in tools or ()
            if isinstance(t, Mapping)
            and isinstance(t.get("function"), Mapping)
            and t["function"].get("strict") is False
        )
        return dataclasses.replace(setup, open_tools=open_tools) if open_tools else setup

    def call_schema(self) -> dict[str, Any] | None:
        """The JSON schema a forced call is generated under (None unless forced), each tool's
        arguments closed unless it is strict: false."""
        if not self.forced:
            return None
        tools = [t for t in self.tools if self.mode == "required" or t.name == self.name]
        schemas = []
        for tool in tools:
            schema = tool.call_schema()
            if tool.name not in self.open_tools:
                schema["properties"]["arguments"] = close_objects(tool.parameters)
            schemas.append(schema)
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}

    def constraint(self) -> GuidedSpec | None:
        """The JSON schema a forced call is generated under (None unless forced)."""
        schema = self.call_schema()
        if schema is None:
            return None
        return GuidedSpec(json_schema=json.dumps(schema, ensure_ascii=False))

    def auto_constraint(self) -> GuidedSpec:
        """tool_choice "auto": text that does not start with `{`, or a call under the tools'
        (closed) schemas. A call inside text (a fence, tags) stays free, parsed as before."""
        schema = dataclasses.replace(self, mode="required").call_schema() or {}
        # No free whitespace, as for the other JSON constraints (sorai/engine/guided/compile.py).
        schema["x-guidance"] = {"whitespace_flexible": False}
        text = json.dumps(schema, ensure_ascii=False)
        return GuidedSpec(
            grammar=f"{TOOL_CALL_OR_TEXT}start: call | TEXT\ncall: %json {text}\n"
            "TEXT: /[^{][\\s\\S]*/\n"
        )

    def constrain(self, guided: GuidedSpec | None, source: str | None = None) -> GuidedSpec | None:
        """The constraint to generate under: a forced call's, else `guided` (the request's
        own, from the field `source`); both at once is a ToolError naming `source`."""
        if not self.forced:
            if guided is None and self.mode == "auto" and self.tools:
                return self.auto_constraint()
            return guided
        if guided is not None:
            choice = "'required'" if self.mode == "required" else f"naming {self.name!r}"
            raise ToolError(
                f"tool_choice {choice} constrains the output to a tool call; it cannot be "
                f"combined with {source or 'another output constraint'}",
                param=source,
            )
        return self.constraint()
