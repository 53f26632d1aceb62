"""The `react` strategy: the model writes Thought / Action / Action Input as text, generation
stops where it would write "Observation:", the agent runs the tool and writes the Observation.

Works with any chat endpoint (no tool-calling support needed). Parsing is forgiving: the
labels in any case, the input as a JSON object, a bare value (for one-argument tools) or
inside a code fence, `Action: tool(input)` on one line. Output that still cannot be read is
answered with an Observation saying what was wrong and what the format is, and the model tries
again.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sorai.apps.agent.strategy import Call, Decision, refused, usage
from sorai.apps.agent.tools import Toolbox, ToolResult

FORMAT = """Use this format:

Thought: what to do next
Action: the tool to use, one of [{names}]
Action Input: the tool's arguments as a JSON object
Observation: the tool's result (it is given to you: stop after Action Input)
... (Thought, Action, Action Input and Observation may repeat)
Thought: I know the answer
Final Answer: the answer to the task"""

SYSTEM = (
    """Complete the user's task. You can use these tools:

{tools}

"""
    + FORMAT
)

STOP = ["\nObservation:", "Observation:"]
FORCE = "You have no more steps. Reply now with 'Final Answer:' and your best answer."

_LABEL = r"(?im)^[ \t*#]*{}[ \t*]*:[ \t]*"
_ACTION = re.compile(_LABEL.format(r"action(?![ \t]*input)"))
_INPUT = re.compile(_LABEL.format(r"action[ \t_]*input"))
_FINAL = re.compile(_LABEL.format(r"final[ \t_]*answer"))
_THOUGHT = re.compile(_LABEL.format("thought"))
_OBSERVATION = re.compile(_LABEL.format("observation"))
_FENCE = re.compile(r"^```[\w-]*\s*|\s*```$")
_INLINE_CALL = re.compile(r"^([\w.:-]+)\s*(?:\((.*)\)|\[(.*)\])\s*$", re.S)  # tool(x), tool[x]


def _input_value(text: str) -> Any:
    text = _FENCE.sub("", text.strip()).strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start = text.find("{")
    if start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            pass
    return text.strip("\"'`")


def parse(text: str) -> Decision:
    """Read one ReAct turn: an action, a final answer, or an error saying what is wrong."""
    observation = _OBSERVATION.search(text)
    if observation:  # the model went on to invent the observation itself: ignore from there
        text = text[: observation.start()]
    action = _ACTION.search(text)
    final = _FINAL.search(text)
    first = min((m for m in (action, final) if m), key=lambda m: m.start(), default=None)
    thought = text[: first.start()] if first else text
    thought = _THOUGHT.sub("", thought).strip() or None
    if first is None:
        return Decision(
            text,
            thought,
            error="your reply has neither 'Action:' (with 'Action Input:') nor 'Final Answer:'",
        )
    if first is final:
        # An action written after the answer (LangChain refuses the pair) is dropped with
        # everything from it: the answer stands.
        answer = text[final.end() : action.start() if action else len(text)].strip()
        if answer:
            return Decision(text, thought, answer=answer)
        return Decision(text, thought, error="'Final Answer:' is empty")
    line_end = text.find("\n", action.end())
    name = (
        text[action.end() : len(text) if line_end < 0 else line_end].strip().strip("`'\"*").strip()
    )
    given = _INPUT.search(text, action.end())
    inline = _INLINE_CALL.match(name)
    if inline and given is None:
        inner = inline.group(2) if inline.group(2) is not None else inline.group(3)
        name, value = inline.group(1), _input_value(inner)
    elif given is None:
        return Decision(text, thought, error=f"'Action: {name}' has no 'Action Input:' line")
    else:
        rest = text[given.end() :]
        end = _FINAL.search(rest) or _THOUGHT.search(rest)
        value = _input_value(rest[: end.start()] if end else rest)
    if not name:
        return Decision(text, thought, error="'Action:' names no tool")
    return Decision(text, thought, calls=[Call(name, value)])


class ReactStrategy:
    name = "react"

    def __init__(self) -> None:
        self._names = ""
        self._stop = True  # False once the endpoint refused `stop`: the parser cuts instead

    def start(
        self, system: str | None, history: list[dict[str, Any]], task: str, tools: Toolbox
    ) -> list[dict[str, Any]]:
        self._names = ", ".join(tools.names)
        listing = "\n".join(f"{t.signature()}: {t.description}" for t in tools)
        prompt = SYSTEM.format(tools=listing or "(none)", names=self._names)
        if system:
            prompt = system.strip() + "\n\n" + prompt
        return [{"role": "system", "content": prompt}, *history, {"role": "user", "content": task}]

    def decide(
        self,
        client: Any,
        messages: list[dict[str, Any]],
        tools: Toolbox,
        forced: bool,
        sampling: dict[str, Any],
    ) -> Decision:
        if forced:
            response = client.chat([*messages, {"role": "user", "content": FORCE}], **sampling)
        elif self._stop:
            try:
                response = client.chat(messages, stop=STOP, **sampling)
            except Exception as e:
                if not refused(e):
                    raise
                self._stop = False
                response = client.chat(messages, **sampling)
        else:
            response = client.chat(messages, **sampling)
        text = response.choices[0].message.content or ""
        decision = parse(text)
        if forced and decision.answer is None:
            # Whatever it wrote is the best answer there is.
            decision = Decision(text, decision.thought, answer=decision.thought or text.strip())
        decision.prompt_tokens, decision.completion_tokens = usage(response)
        return decision

    def record(
        self,
        messages: list[dict[str, Any]],
        decision: Decision,
        results: list[tuple[Call, ToolResult]],
    ) -> None:
        messages.append({"role": "assistant", "content": decision.raw.strip()})
        if decision.error:
            feedback = f"Observation: Invalid format: {decision.error}. " + FORMAT.format(
                names=self._names
            ).replace("Use this", "Reply in this")
            messages.append({"role": "user", "content": feedback})
            return
        observations = "\n".join(f"Observation: {result.output}" for _, result in results)
        messages.append({"role": "user", "content": observations})
