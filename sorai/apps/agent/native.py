"""The `tools` strategy: the API's own `tools` / `tool_calls`, every step a required call.

Each step is requested with tool_choice "required" over the tools plus `final_answer`, so an
endpoint with guided decoding (sorai's, vLLM's) can only return a well-formed call of a real
tool with arguments that fit its schema; the run ends when the model calls final_answer. Small
models rarely choose final_answer on their own: given a result they call the same tool again.
The agent's loop treats such a repeated call as "done" and forces the answer, here by naming
final_answer in tool_choice (its `answer` has minLength 1, so it cannot come back empty).
"""

from __future__ import annotations

import json
from typing import Any

from sorai.apps.agent.strategy import Call, Decision, refused, usage
from sorai.apps.agent.tools import Toolbox, ToolResult

FINAL_ANSWER = "final_answer"
SYSTEM = (
    "Complete the user's task with the tools, one call at a time. When you have the answer, "
    f"call {FINAL_ANSWER} with it."
)
ANSWER_NOW = "Answer the task now, in plain text, from what the tools returned."
FINAL_TOOL = {
    "type": "function",
    "function": {
        "name": FINAL_ANSWER,
        "description": "Give the final answer to the user's task and stop.",
        "parameters": {
            "type": "object",
            "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": 2000}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    },
}


def _arguments(text: str | None) -> tuple[Any, str | None]:
    try:
        return json.loads(text or "{}"), None
    except json.JSONDecodeError as e:
        return text, f"the arguments are not JSON ({e.msg})"


class NativeStrategy:
    name = "tools"

    def __init__(self) -> None:
        # The tool_choice values to try, strictest first; one the endpoint refuses with a 400
        # is dropped for the rest of the run (OpenAI-compatible servers differ: some take only
        # "auto").
        self._choices: list[Any] = ["named", "required", "auto"]

    def _chat(
        self,
        client: Any,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        forced: bool,
        sampling: dict[str, Any],
    ) -> Any:
        choices = [c for c in self._choices if forced or c != "named"]
        for i, choice in enumerate(choices):
            value = {"type": "function", "function": {"name": FINAL_ANSWER}}
            try:
                return client.chat(
                    messages,
                    tools=tools,
                    tool_choice=value if choice == "named" else choice,
                    **sampling,
                )
            except Exception as e:
                if not refused(e) or i == len(choices) - 1:
                    raise
                self._choices.remove(choice)
        raise AssertionError("unreachable")  # the last choice returns or raises

    def start(
        self, system: str | None, history: list[dict[str, Any]], task: str, tools: Toolbox
    ) -> list[dict[str, Any]]:
        prompt = SYSTEM if not system else system.strip() + "\n\n" + SYSTEM
        return [{"role": "system", "content": prompt}, *history, {"role": "user", "content": task}]

    def decide(
        self,
        client: Any,
        messages: list[dict[str, Any]],
        tools: Toolbox,
        forced: bool,
        sampling: dict[str, Any],
    ) -> Decision:
        definitions = [t.definition() for t in tools] + [FINAL_TOOL]
        response = self._chat(client, messages, definitions, forced, sampling)
        choice = response.choices[0]
        message = choice.message
        prompt, completion = usage(response)
        calls = []
        for item in message.tool_calls or []:
            function = getattr(item, "function", None)
            if function is None:  # a call of a kind other than "function"
                continue
            arguments, error = _arguments(function.arguments)
            if error:
                if choice.finish_reason == "length":
                    error += f"; the reply was cut off at max_tokens ({sampling.get('max_tokens')})"
                return Decision(
                    function.arguments or "", error=f"{function.name}: {error}",
                    prompt_tokens=prompt, completion_tokens=completion,
                )  # fmt: skip
            calls.append(Call(function.name, arguments, item.id or ""))
        raw = json.dumps(
            [{"name": c.name, "arguments": c.arguments} for c in calls], ensure_ascii=False
        )
        thought = (message.content or "").strip() or None
        decision = Decision(
            raw, thought, prompt_tokens=prompt, completion_tokens=completion
        )  # fmt: skip
        if calls and calls[0].name == FINAL_ANSWER:
            answer = calls[0].arguments
            decision.answer = str(answer.get("answer", "") if isinstance(answer, dict) else answer)
            if not decision.answer.strip() and not forced:
                # An endpoint without guided decoding may send what minLength forbids.
                decision.answer = None
                decision.error = f"{FINAL_ANSWER} needs a non-empty answer"
        elif calls:
            decision.calls = [c for c in calls if c.name != FINAL_ANSWER]
        elif thought:  # an endpoint that ignored tool_choice and answered in text
            decision.raw, decision.answer = thought, thought
        else:
            decision.error = "the reply had neither a tool call nor text"
        if forced and not (decision.answer or "").strip():
            # A blank final_answer, or an endpoint that ignored the named tool_choice and
            # called another tool: asked once more in plain text.
            decision.calls, decision.error = [], None
            self._answer_in_text(client, messages, sampling, decision)
        return decision

    @staticmethod
    def _answer_in_text(
        client: Any, messages: list[dict[str, Any]], sampling: dict[str, Any], decision: Decision
    ) -> None:
        """No usable forced answer (a small model may fill final_answer with spaces): ask once
        more without tools, in plain text, which such models answer best."""
        response = client.chat([*messages, {"role": "user", "content": ANSWER_NOW}], **sampling)
        decision.answer = (response.choices[0].message.content or "").strip()
        prompt, completion = usage(response)
        decision.prompt_tokens += prompt
        decision.completion_tokens += completion

    def record(
        self,
        messages: list[dict[str, Any]],
        decision: Decision,
        results: list[tuple[Call, ToolResult]],
    ) -> None:
        if decision.error:
            messages.append({"role": "assistant", "content": decision.raw or "(nothing)"})
            messages.append(
                {"role": "user", "content": f"That did not work: {decision.error}. Try again."}
            )
            return
        for i, (call, _) in enumerate(results):
            call.id = call.id or f"call_{len(messages)}_{i}"
        messages.append(
            {
                "role": "assistant",
                "content": decision.thought,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.name,
                            "arguments": json.dumps(call.arguments, ensure_ascii=False),
                        },
                    }
                    for call, _ in results
                ],
            }
        )
        for call, result in results:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result.output})
