"""The agent's loop: ask the model, run the tools it calls, feed back what happened, until it
answers or a limit runs out; then the answer is demanded.

    with sorai.connect() as client:
        agent = Agent(client, tools=["calculator"], strategy="tools")
        trace = agent.run("What is 1234 * 5678? Use the calculator.")
        trace.answer, [(s.tool, s.arguments, s.observation) for s in trace.tool_calls]
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sorai.apps.agent.native import FINAL_ANSWER, NativeStrategy
from sorai.apps.agent.react import ReactStrategy
from sorai.apps.agent.strategy import Call, Decision, Strategy
from sorai.apps.agent.tools import Tool, Toolbox, ToolResult
from sorai.apps.agent.trace import Printer, Step, Trace, default_trace_dir
from sorai.errors import SoraiError

STRATEGIES: dict[str, Callable[[], Strategy]] = {"react": ReactStrategy, "tools": NativeStrategy}
NO_ANSWER = "(no answer)"
REPEATS = 2  # the same failing call this many times ends the loop


class Agent:
    """A tool-using agent over a chat `client` (a `sorai.apps.client.Client`, or anything with
    its `chat(messages, **kwargs)`).

    tools: Tool objects, typed functions, or built-in names (see `builtin.build_tools`; those
    that touch files need `workspace`). strategy: "tools" (native tool calls, guided) or
    "react" (text). The limits: `max_iterations` model turns and `max_seconds` of wall clock,
    checked between steps and passed down as tools' time limits; when either runs out, the
    model is asked for its answer one last time. Conversations carry over between `run`s (the
    tasks and answers of the last `history_turns`, not the intermediate steps) until
    `reset()`.
    """

    def __init__(
        self,
        client: Any,
        tools: Iterable[Tool | Callable[..., Any] | str] = (),
        strategy: str = "tools",
        workspace: str | os.PathLike | None = None,
        system: str | None = None,
        max_iterations: int = 8,
        max_seconds: float = 300.0,
        temperature: float = 0.0,
        max_tokens: int = 512,
        trace_dir: str | os.PathLike | None = None,
        on_step: Callable[[Step], None] | None = None,
        verbose: bool = False,
        index: str | os.PathLike | None = None,
        history_turns: int = 10,
    ) -> None:
        if strategy not in STRATEGIES:
            raise SoraiError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
        if max_iterations < 1:
            raise SoraiError(f"max_iterations must be at least 1, got {max_iterations}")
        if max_seconds <= 0:
            raise SoraiError(f"max_seconds must be positive, got {max_seconds}")
        from sorai.apps.agent.builtin import build_tools

        self.client = client
        self.toolbox = Toolbox(build_tools(list(tools), workspace, client, index))
        if strategy == "tools" and FINAL_ANSWER in self.toolbox:
            raise SoraiError(f"the tool name {FINAL_ANSWER!r} is the tools strategy's own")
        self.strategy: Strategy = STRATEGIES[strategy]()
        self.system = system
        self.max_iterations = max_iterations
        self.max_seconds = max_seconds
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        self.trace_dir = Path(trace_dir) if trace_dir is not None else default_trace_dir()
        self.on_step = on_step or (Printer() if verbose else None)
        self.history: list[dict[str, Any]] = []
        self.history_turns = history_turns

    def reset(self) -> None:
        """Forget the conversation."""
        self.history = []

    def _emit(self, trace: Trace, step: Step) -> None:
        trace.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)

    def run(self, task: str) -> Trace:
        """Work on `task` until an answer; the trace (also written as JSON) holds every step."""
        if not task.strip():
            raise SoraiError("the task is empty")
        started = time.monotonic()
        model = getattr(self.client, "model", "unknown")
        trace = Trace(task, self.strategy.name, str(model))
        try:
            stop = self._loop(task, trace, started + self.max_seconds)
        except BaseException as e:
            # The endpoint failed (or Ctrl-C): what happened so far is still worth keeping,
            # unless keeping it fails too, which must not hide the error itself.
            trace.stop_reason = f"error: {e}" if str(e) else f"error: {type(e).__name__}"
            trace.seconds = time.monotonic() - started
            with contextlib.suppress(OSError):
                trace.write(self.trace_dir)
            raise
        trace.answer = trace.steps[-1].answer
        trace.stop_reason = stop
        trace.seconds = time.monotonic() - started
        trace.write(self.trace_dir)
        self.history += [
            {"role": "user", "content": task},
            {"role": "assistant", "content": trace.answer},
        ]
        # The oldest exchanges go: a long conversation would outgrow memory and the context.
        del self.history[: max(len(self.history) - 2 * self.history_turns, 0)]
        return trace

    def _loop(self, task: str, trace: Trace, deadline: float) -> str:
        """Steps until an answer or a limit; the answer is forced in the latter case. Returns
        why it stopped."""
        messages = self.strategy.start(self.system, self.history, task, self.toolbox)
        done: set[str] = set()
        failed: dict[str, int] = {}
        stop = "max_iterations"

        def done_before(call: Call) -> bool:
            return call.key() in done or failed.get(call.key(), 0) >= REPEATS

        for _ in range(self.max_iterations):
            if time.monotonic() >= deadline:
                stop = "time_limit"
                break
            decision, seconds = self._decide(messages, forced=False)
            if decision.answer is not None:
                self._emit(trace, self._answer_step(trace, decision, seconds, forced=False))
                stop = "answer"
                break
            if decision.error is not None:
                self.strategy.record(messages, decision, [])
                self._emit(trace, self._error_step(trace, decision, seconds))
                continue
            if all(done_before(call) for call in decision.calls):
                # Nothing new would come of it: a call that worked (the small models' way of
                # saying they are done), or one that failed the same way REPEATS times.
                stop = "repeated_call"
                break
            results = self._run_calls(decision.calls, deadline)
            self.strategy.record(messages, decision, results)
            for i, (call, result) in enumerate(results):
                if result.ok:
                    done.add(call.key())
                else:
                    failed[call.key()] = failed.get(call.key(), 0) + 1
                first = i == 0
                self._emit(
                    trace,
                    Step(
                        len(trace.steps) + 1,
                        "tool",
                        thought=decision.thought if first else None,
                        tool=call.name,
                        arguments=call.arguments,
                        observation=result.output,
                        ok=result.ok,
                        model_output=decision.raw if first else None,
                        prompt_tokens=decision.prompt_tokens if first else 0,
                        completion_tokens=decision.completion_tokens if first else 0,
                        model_seconds=seconds if first else 0.0,
                        tool_seconds=result.seconds,
                    ),
                )
        if stop != "answer":
            decision, seconds = self._decide(messages, forced=True)
            if not (decision.answer or "").strip():
                decision.answer = self._fallback(trace)
            self._emit(trace, self._answer_step(trace, decision, seconds, forced=True))
        return stop

    def _decide(self, messages: list[dict[str, Any]], forced: bool) -> tuple[Decision, float]:
        started = time.monotonic()
        decision = self.strategy.decide(
            self.client, messages, self.toolbox, forced, dict(self.sampling)
        )
        return decision, time.monotonic() - started

    def _run_calls(self, calls: list[Call], deadline: float) -> list[tuple[Call, ToolResult]]:
        results = []
        for call in calls:
            tool = self.toolbox.get(call.name)
            if tool is None:
                results.append((call, self.toolbox.call(call.name, call.arguments)))
                continue
            left = max(deadline - time.monotonic(), 0.1)
            results.append((call, tool(call.arguments, timeout=min(tool.timeout, left))))
        return results

    @staticmethod
    def _fallback(trace: Trace) -> str:
        observed = [s for s in trace.steps if s.kind == "tool" and s.ok]
        if observed:
            last = observed[-1]
            return f"The last result ({last.tool}): {last.observation}"
        return NO_ANSWER

    @staticmethod
    def _answer_step(trace: Trace, decision: Decision, seconds: float, forced: bool) -> Step:
        return Step(
            len(trace.steps) + 1,
            "answer",
            thought=decision.thought,
            answer=(decision.answer or "").strip(),
            forced=forced,
            model_output=decision.raw,
            prompt_tokens=decision.prompt_tokens,
            completion_tokens=decision.completion_tokens,
            model_seconds=seconds,
        )

    @staticmethod
    def _error_step(trace: Trace, decision: Decision, seconds: float) -> Step:
        return Step(
            len(trace.steps) + 1,
            "error",
            thought=decision.thought,
            observation=decision.error,
            ok=False,
            model_output=decision.raw,
            prompt_tokens=decision.prompt_tokens,
            completion_tokens=decision.completion_tokens,
            model_seconds=seconds,
        )
