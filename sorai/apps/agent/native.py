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

from sorai.apps.agent.strategy import Call, Decision, usage
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
        choice: Any = "required"
        if forced:
            choice = {"type": "function", "function": {"name": FINAL_ANSWER}}
        response = client.chat(messages, tools=definitions, tool_choice=choice, **sampling)
        message = response.choices[0].message
        prompt, completion = usage(response)
        calls = []
        for item in message.tool_calls or []:
            arguments, error = _arguments(item.function.arguments)
            if error:
                return Decision(
                    item.function.arguments or "", error=f"{item.function.name}: {error}",
                    prompt_tokens=prompt, completion_tokens=completion,
                )  # fmt: skip
            calls.append(Call(item.function.name, arguments, item.id))
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
            if forced and not decision.answer.strip():
                self._answer_in_text(client, messages, sampling, decision)
        elif calls:
            decision.calls = [c for c in calls if c.name != FINAL_ANSWER]
        elif thought:  # an endpoint that ignored tool_choice and answered in text
            decision.raw, decision.answer = thought, thought
        else:
            decision.error = "the reply had neither a tool call nor text"
        return decision

    @staticmethod
    def _answer_in_text(
        client: Any, messages: list[dict[str, Any]], sampling: dict[str, Any], decision: Decision
    ) -> None:
        """A blank forced answer (a small model may fill final_answer with spaces): ask once
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
