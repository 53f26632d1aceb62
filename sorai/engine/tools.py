"""A request's tools at the engine: the chat renderer's ToolChoice plus a forced call's GuidedSpec.

The prompt, the fallback format and parsing calls out of the output live in sorai/model/chat.py
(see its docstring); this adds only what needs the engine's request parameters: a forced call
(tool_choice "required" or a named function) becomes a JSON-schema GuidedSpec. `LLM.chat` uses
it directly; the server (sorai/server/tools.py) wraps it in its protocol types.
"""

from __future__ import annotations

import json

from sorai.engine.params import GuidedSpec
from sorai.errors import ToolError
from sorai.model.chat import ToolChoice


class ToolSetup(ToolChoice):
    """ToolChoice (from_request, active, forced, encode, answer, ...) with the constraint its
    forced calls are generated under."""

    def constraint(self) -> GuidedSpec | None:
        """The JSON schema a forced call is generated under (None unless forced)."""
        schema = self.call_schema()
        if schema is None:
            return None
        return GuidedSpec(json_schema=json.dumps(schema, ensure_ascii=False))

    def constrain(self, guided: GuidedSpec | None, source: str | None = None) -> GuidedSpec | None:
        """The constraint to generate under: a forced call's, else `guided` (the request's
        own, from the field `source`); both at once is a ToolError naming `source`."""
        if not self.forced:
            return guided
        if guided is not None:
            choice = "'required'" if self.mode == "required" else f"naming {self.name!r}"
            raise ToolError(
                f"tool_choice {choice} constrains the output to a tool call; it cannot be "
                f"combined with {source or 'another output constraint'}",
                param=source,
            )
        return self.constraint()
