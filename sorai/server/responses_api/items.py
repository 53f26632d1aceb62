"""Responses API items <-> chat messages.

Input items (a string, messages with input_text parts, function_call and function_call_output
items, the hosted tools' file_search_call and code_interpreter_call items) become the
OpenAI-shaped chat messages sorai/model/chat.py renders; a request's tools, tool_choice and
text.format become their chat-completions spellings; an answer (content and tool calls)
becomes output items.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from sorai.server.errors import bad_request

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def input_items(value: Any, hosted: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The request's `input` as a list of items, each with an id (for input_items.list);
    `hosted` (kind -> HostedTool) reads the items of its tools' calls."""
    calls = {f"{kind}_call": tool for kind, tool in (hosted or {}).items()}
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request(
            "input must be a string or a non-empty list of items (messages, function_call, "
            f"function_call_output); got {_short(value)}",
            param="input",
        )
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad_request(f"input[{i}] must be an object, got {_short(item)}", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            items.append(_message_item(i, item))
        elif kind == "function_call":
            _require_strings(i, item, ("call_id", "name", "arguments"))
            items.append(
                {
                    "type": "function_call",
                    "id": item.get("id") or new_item_id("fc"),
                    "call_id": item["call_id"],
                    "name": item["name"],
                    "arguments": item["arguments"],
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            _require_strings(i, item, ("call_id",))
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output)
            items.append(
                {
                    "type": "function_call_output",
                    "id": item.get("id") or new_item_id("fco"),
                    "call_id": item["call_id"],
                    "output": output,
                    "status": "completed",
                }
            )
        elif kind in calls:
            try:
                calls[kind].replay(item)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise bad_request(
                    f"input[{i}] is a {kind} item this server cannot read: {_short(item)}",
                    param=f"input[{i}]",
                ) from None
            # An id the client left out, in the tool's own form (fs_..., ci_...).
            prefix = "".join(word[0] for word in kind.split("_")[:2])
            items.append({**item, "id": item.get("id") or new_item_id(prefix)})
        else:
            kinds = ", ".join(["message", "function_call", "function_call_output", *calls])
            raise bad_request(
                f"input[{i}] has type {kind!r}; this server takes these items: {kinds}",
                param=f"input[{i}].type",
            )
    return items


def _message_item(i: int, item: dict[str, Any]) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(
            f"input[{i}].role must be one of {', '.join(_ROLES)}; got {_short(role)}",
            param=f"input[{i}].role",
        )
    content = item.get("content")
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts = [{"type": kind, "text": content}]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            part_type = part.get("type") if isinstance(part, dict) else None
            if part_type not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"input[{i}].content[{j}] is {_short(part)}: this server's models read "
                    "text only, so send input_text parts ({'type': 'input_text', 'text': ...})",
                    param=f"input[{i}].content",
                )
            parts.append({"type": part_type, "text": part["text"]})
    else:
        raise bad_request(
            f"input[{i}].content must be a string or a list of input_text parts; got "
            f"{_short(content)}",
            param=f"input[{i}].content",
        )
    message = {
        "type": "message",
        "id": item.get("id") or new_item_id("msg"),
        "role": role,
        "content": parts,
        "status": "completed",
    }
    return message


def chat_messages(
    items: list[dict[str, Any]], hosted: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Input or output items -> chat messages; consecutive function calls are one assistant
    turn with several tool calls. A hosted tool's call item (`hosted`: kind -> HostedTool)
    is the call the model made by the tool's function name and a tool message with the
    result it read, so a later turn shows the model both."""
    calls = {f"{kind}_call": (kind, tool) for kind, tool in (hosted or {}).items()}
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "\n".join(part["text"] for part in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            _add_call(messages, item["call_id"], item["name"], item["arguments"])
        elif kind in calls:
            name, tool = calls[kind]
            arguments, result = tool.replay(item)
            _add_call(messages, item["id"], name, json.dumps(arguments, ensure_ascii=False))
            messages.append({"role": "tool", "tool_call_id": item["id"], "content": result})
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
    return messages


def _add_call(messages: list[dict[str, Any]], call_id: str, name: str, arguments: str) -> None:
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
        last["tool_calls"].append(call)
    elif last is not None and last["role"] == "assistant" and "tool_calls" not in last:
        # The text the model said before its call (a message item, then the call's item):
        # one assistant turn, as chat completions put it, not two in a row.
        last["tool_calls"] = [call]
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def chat_tools(tools: Any, hosted: Mapping[str, Any] | None = None) -> list[dict[str, Any]] | None:
    """The request's tools in chat-completions form ({"type", "function": {...}}); a hosted
    tool (`hosted`: kind -> HostedTool) as the function the model calls it by."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request(f"tools must be a list, got {_short(tools)}", param="tools")
    hosted = hosted or {}
    converted = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in hosted:
            converted.append({"type": "function", "function": hosted[kind].function(tool)})
            continue
        if kind != "function":
            kinds = ", ".join(["function", *sorted(hosted)])
            raise bad_request(
                f"tools[{i}] has type {kind!r}; this server runs these tool types: {kinds}",
                param=f"tools[{i}].type",
            )
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool
        }
        if function.get("strict") is None:
            function.pop("strict", None)
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: Any, hosted: Mapping[str, Any] | None = None) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(choice, dict) and choice.get("type") in (hosted or {}):
        # {"type": "file_search"}: a call to that hosted tool's function
        return {"type": "function", "function": {"name": choice["type"]}}
    return choice


def response_format(text: Any) -> Any:
    """text.format -> chat's response_format (json_schema's fields sit one level down there)."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": inner}
    return fmt


def message_item(
    text: str, item_id: str | None = None, annotations: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": annotations or [], "logprobs": []}
    return {
        "type": "message",
        "id": item_id or new_item_id("msg"),
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }


def function_call_item(
    call_id: str, name: str, arguments: str, item_id: str | None = None
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id or new_item_id("fc"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def _require_strings(i: int, item: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if not isinstance(item.get(key), str):
            raise bad_request(
                f"input[{i}] ({item.get('type')}) needs {key!r} as a string; got "
                f"{_short(item.get(key))}",
                param=f"input[{i}].{key}",
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
