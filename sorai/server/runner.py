"""One API request on the engine: an engine request per prompt, their outputs merged, every
engine request aborted (and its KV blocks freed) however the API request ends: by the client,
by the server's per-request time limit, or by a shutdown whose grace period ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from starlette.requests import Request

from sorai.engine.outputs import RequestOutput
from sorai.engine.params import SamplingParams
from sorai.errors import EngineDeadError, SoraiError
from sorai.server.errors import APIError
from sorai.server.responses import aborted

if TYPE_CHECKING:
    from sorai.server.state import ServerState

T = TypeVar("T")

Job = tuple[list[int], SamplingParams]

# The scheduling priority of the engine requests made in this context: 0 for clients, higher
# for a batch's lines (server/batch_runner.py sets it around each in-process request).
PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("sorai_priority", default=0)


class Generation:
    """Runs `jobs` (prompt ids, params) as engine requests `<request_id>-<i>`.

    start() admits them all and waits for each one's first output, so that a full queue or a
    dead engine becomes the response's status rather than a broken stream. outputs() then
    yields (prompt index, RequestOutput) in arrival order. close() must follow, always: it
    aborts whatever has not finished (breaking off an engine stream aborts its request).
    """

    def __init__(self, state: ServerState, jobs: list[Job], request_id: str, arrival: float):
        self._state = state
        self._engine = state.engine
        self._arrival = arrival
        priority = self.priority = PRIORITY.get()
        if priority:
            jobs = [(ids, dataclasses.replace(params, priority=priority)) for ids, params in jobs]
        self._jobs = jobs
        self._request_ids = [f"{request_id}-{i}" for i in range(len(jobs))]
        self._trackers = [state.metrics.tracker(arrival, params.n) for _, params in jobs]
        self._streams: list[Any] = []
        self._first: list[RequestOutput | None] = [None] * len(jobs)
        self._finished = [False] * len(jobs)
        self._merged: Any = None
        # Why this server aborted the engine requests (time limit, shutdown), once it has.
        self._error: APIError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._aborts: list[asyncio.Future[None]] = []  # referenced until they have run

    def check(self) -> None:
        """Length and vocabulary checks of every job, before any is admitted."""
        for prompt_ids, params in self._jobs:
            self._engine.check_request(prompt_ids, params)

    async def start(self) -> None:
        if self._engine.dead:
            raise EngineDeadError("the inference engine has stopped and serves no more requests")
        running = self._state.running
        if running.refusal is not None:
            raise running.refusal
        timeout = self._state.settings.request_timeout
        if timeout is not None:
            left = timeout - (time.perf_counter() - self._arrival)
            error = request_timed_out(timeout)
            self._timer = asyncio.get_running_loop().call_later(max(0.0, left), self.expire, error)
        running.generations.add(self)
        try:
            for (prompt_ids, params), request_id in zip(self._jobs, self._request_ids, strict=True):
                self._streams.append(self._engine.generate(prompt_ids, params, request_id))
            results = await asyncio.gather(
                *(self._first_output(i) for i in range(len(self._streams))),
                return_exceptions=True,
            )
        except BaseException:
            await self.close()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            # A user-facing error (429, 503) wins over e.g. a cancellation of a sibling.
            raise next((e for e in errors if isinstance(e, SoraiError)), errors[0])

    async def _first_output(self, i: int) -> None:
        try:
            output = await anext(self._streams[i])
        except StopAsyncIteration:
            self._finished[i] = True
            return
        self._record(i, output)
        self._first[i] = output

    def _record(self, i: int, output: RequestOutput) -> None:
        self._trackers[i].on_output(output, time.perf_counter())
        if output.finished:
            self._finished[i] = True

    def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        self._merged = self._outputs()
        return self._merged

    async def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        for i, first in enumerate(self._first):
            if first is not None:
                self._first[i] = None
                yield i, first
        pending = [i for i, done in enumerate(self._finished) if not done]
        if len(pending) == 1:
            i = pending[0]
            async for output in self._streams[i]:
                self._record(i, output)
                yield i, output
            self._finished[i] = True
        elif pending:
            # aclosing: an abandoned merge must still cancel its pumps before close() runs.
            async with contextlib.aclosing(self._merge(pending)) as merged:
                async for item in merged:
                    yield item

    async def _merge(self, pending: list[int]) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for output in self._streams[i]:
                    self._record(i, output)
                    queue.put_nowait((i, output))
                self._finished[i] = True
                queue.put_nowait((i, None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i)) for i in pending]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    def expire(self, error: APIError) -> None:
        """End the request with `error`: its engine requests are aborted (their KV blocks
        freed at the next step), and the handler, seeing them end with "abort", answers with
        aborted() (a stream: a final error event)."""
        if self._error is not None or all(self._finished):
            return
        self._error = error
        self._aborts = [
            asyncio.ensure_future(self._engine.abort(request_id))
            for request_id in self._request_ids[: len(self._streams)]
        ]

    def aborted(self) -> APIError:
        """The error for a request whose engine requests ended with "abort"."""
        return self._error if self._error is not None else aborted()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._state.running.generations.discard(self)
        if not self.priority:
            self._state.running.interactive_ended = time.monotonic()
        # Shielded: this runs while a disconnected client's task is being cancelled, and an
        # interrupted cleanup would leave engine requests holding KV blocks.
        with anyio.CancelScope(shield=True):
            if self._merged is not None:
                with contextlib.suppress(Exception):
                    await self._merged.aclose()
            for stream in self._streams:
                with contextlib.suppress(Exception):
                    await stream.aclose()
            for tracker in self._trackers:
                tracker.close()


def request_timed_out(seconds: float) -> APIError:
    # 408, and no automatic retry: the openai client would otherwise resend a request that
    # is as slow the second time.
    return APIError(
        408,
        f"the request ran past this server's time limit of {seconds:g} s (--request-timeout) "
        "and was stopped; ask for fewer tokens (max_tokens) or a shorter prompt",
        type="timeout_error",
        code="request_timeout",
        headers={"x-should-retry": "false"},
    )


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the client goes away first (its body is read)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        # Nobody is left to read the answer: status 499 (nginx's "client closed request").
        raise APIError(499, "the client closed the connection")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await task
