"""AsyncEngine: the LLMEngine on a background thread, with an async stream per request.

The step loop owns the engine; the event loop only queues commands (add, abort) and receives
outputs. Torch releases the GIL inside its kernels, so the server keeps accepting and
streaming while a forward runs. A request whose consumer goes away (client disconnect, task
cancelled) is aborted and its blocks are freed at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import torch

from sorai.engine.config import EngineConfig
from sorai.engine.llm_engine import LLMEngine
from sorai.engine.outputs import EngineStats, RequestOutput
from sorai.engine.params import SamplingParams
from sorai.errors import EngineDeadError, QueueFullError

log = logging.getLogger("sorai.engine")


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.tokenizer = engine.tokenizer
        self.context_length = engine.context_length
        self.vocab_size = engine.vocab_size
        self.runtime = engine.runtime
        self.image_encoder = engine.image_encoder  # None for a text-only model
        self.adapters = engine.adapters  # thread-safe: the server registers, the step uses
        self.dead = False
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = engine.stats()

    @classmethod
    def from_model(
        cls,
        model: str | os.PathLike = "smollm2-135m-instruct",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        config: EngineConfig | None = None,
        adapter: str | os.PathLike | None = None,
        quantize: str = "auto",
        adapters: Mapping[str, str | os.PathLike] | None = None,
    ) -> AsyncEngine:
        return cls(
            LLMEngine.from_model(
                model,
                dtype=dtype,
                device=device,
                config=config,
                adapter=adapter,
                quantize=quantize,
                adapters=adapters,
            )
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sorai-engine", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Admit nothing new; give in-flight requests `timeout` seconds, then abort them."""
        self._stopping = True
        if self._thread is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while self._streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self._command("abort", request_id)
        self._command("exit", None)
        await asyncio.to_thread(self._thread.join, 30)
        self._thread = None

    # -- requests -------------------------------------------------------------------------

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_ids, params)

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; leaving the loop early aborts the request."""
        if self.dead:
            raise EngineDeadError("the engine has stopped after an internal error")
        if self._stopping:
            raise EngineDeadError("the server is shutting down")
        if self._thread is None:
            await self.start()
        # Every request in flight either runs (at most max_num_seqs) or waits.
        config = self.engine.config
        if len(self._streams) >= config.max_waiting + config.max_num_seqs:
            raise QueueFullError(
                f"{len(self._streams)} requests are in flight and the queue is full; retry later"
            )
        self.check_request(prompt_ids, params)
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        self._command("add", (request_id, list(prompt_ids), params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._command("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._command("abort", request_id)

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step."""
        return self._stats

    # -- the step thread ------------------------------------------------------------------

    def _command(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_work():
                    self._wake.wait(timeout=1.0)
                self._wake.clear()
                if not self._drain(engine):
                    return
                if not engine.has_work():
                    continue
                outputs = engine.step()
                self._stats = engine.stats()
                if outputs:
                    self._publish(outputs)
        except BaseException as exc:  # the engine is unusable after an internal failure
            log.exception("engine step failed; the engine is stopping")
            self.dead = True
            self._fail_all(EngineDeadError(f"the engine stopped after an internal error: {exc}"))

    def _drain(self, engine: LLMEngine) -> bool:
        """Apply queued commands; False once asked to exit."""
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return True
            if kind == "exit":
                return False
            if kind == "abort":
                engine.abort(payload)
            elif kind == "add":
                request_id, ids, params = payload
                try:
                    engine.add_request(request_id, ids, params)
                except Exception as exc:  # a request error, reported to its own caller
                    self._publish_error(request_id, exc)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _publish_error(self, request_id: str, exc: BaseException) -> None:
        assert self._loop is not None

        def deliver() -> None:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(exc)

        self._loop.call_soon_threadsafe(deliver)

    def _fail_all(self, exc: BaseException) -> None:
        if self._loop is None:
            return

        def deliver() -> None:
            for stream in self._streams.values():
                stream.put_nowait(exc)

        self._loop.call_soon_threadsafe(deliver)
