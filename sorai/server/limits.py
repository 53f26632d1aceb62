"""OpenAI's documented request limits that the protocol types cannot say alone, refused as
OpenAI refuses them: 400, invalid_request_error, `param` naming the field.

Ranges the engine shares with the Python API (temperature, top_p, penalties, n, logit_bias) are
SamplingParams' (sorai/engine/params.py); docs/serving.md ("Limits") lists every limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from sorai.engine.params import MAX_LOGPROBS
from sorai.server.errors import bad_request

MAX_STOP = 4  # stop sequences per request
MAX_TOP_LOGPROBS = MAX_LOGPROBS  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # legacy completions' logprobs
MAX_BEST_OF = 20
MAX_TOOLS = 128
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Content part types OpenAI defines, and what this server does with each.
TEXT_PARTS = ("text",)
REFUSAL_PART = "refusal"  # assistant turns only, read as text
MEDIA_PARTS = ("image_url", "input_audio", "file")
IMAGE_PART = "image_url"  # read through OCR (sorai/server/vision.py); the others are refused


def check_stop(stop: str | list[str] | None) -> None:
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise bad_request(
            f"stop may hold at most {MAX_STOP} sequences, got {len(stop)}", param="stop"
        )


def check_range(name: str, value: int | None, low: int, high: int) -> None:
    """An optional integer field in [low, high]."""
    if value is not None and not low <= value <= high:
        raise bad_request(f"{name} must be in [{low}, {high}], got {value}", param=name)


def check_tools(tools: Any) -> None:
    """OpenAI's count and function-name rules; the rest of a tool's shape is the tool
    parser's (sorai/model/chat.py), whose errors name the field too."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        return
    if len(tools) > MAX_TOOLS:
        raise bad_request(
            f"tools may hold at most {MAX_TOOLS} functions, got {len(tools)}", param="tools"
        )
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str) and not FUNCTION_NAME.match(name):
            raise bad_request(
                f"tools.{i}.function.name must be 1 to 64 letters, digits, '_' or '-' "
                f"(^[a-zA-Z0-9_-]{{1,64}}$), got {name!r:.80}",
                param=f"tools.{i}.function.name",
            )
