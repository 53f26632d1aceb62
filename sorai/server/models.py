"""Several base models in one server (`sorai serve -m A -m B`): one engine each, requests routed
by their `model`, a cached model named by a request loaded on demand within --max-models and
--max-memory-gib, idle models unloaded after their keep-alive (Ollama's `keep_alive`), pinned
ones never. The first model (ServerState.engine) is always loaded."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from sorai import hf, hub, registry
from sorai.errors import SoraiError
from sorai.server.errors import APIError
from sorai.server.logprobs import TokenText
from sorai.server.state import ServerState, get_state

if TYPE_CHECKING:
    from sorai.engine.async_engine import AsyncEngine

log = logging.getLogger("sorai.server")

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: five minutes
DEFAULT_MAX_MODELS = 3
# How often idle models are looked for; unloading is not timed to the second.
_REAP_INTERVAL_S = 0.5
_LEASES = "sorai.model_leases"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: object, param: str = "keep_alive") -> float:
    """Seconds a model stays loaded after its last request: a number of seconds or a duration
    ("5m", "30s", "1h30m"); 0 unloads it right after; negative keeps it loaded (math.inf)."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if parts and "".join(number + unit for number, unit in parts) == body:
                seconds = sign * sum(float(n) * _UNIT_S[unit] for n, unit in parts)
    if seconds is None or math.isnan(seconds):
        raise SoraiError(
            f"{param} must be seconds or a duration such as '5m', '30s' or '1h' (0 unloads "
            f"at once, negative keeps the model loaded), got {value!r}",
            param=param,
        )
    return math.inf if seconds < 0 else seconds


@dataclass
class Loaded:
    """One loaded model: its engine and how long it is wanted."""

    name: str
    engine: AsyncEngine
    size: int  # bytes it takes, as estimated for the memory budget
    pinned: bool
    keep_alive: float
    token_text: TokenText = field(init=False)
    leases: int = 0  # API requests using it now
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.engine.tokenizer)

    def idle_for(self, now: float) -> float:
        return now - self.last_used if self.leases == 0 else 0.0


class ModelPool:
    """The models beside ServerState.engine: loaded ones by name, and what may be loaded."""

    def __init__(
        self,
        load: Callable[[str], AsyncEngine],
        size_of: Callable[[str], int],
        *,
        max_models: int = DEFAULT_MAX_MODELS,
        max_bytes: int | None = None,
        keep_alive: float = DEFAULT_KEEP_ALIVE_S,
        pinned: Iterable[str] = (),
        default_size: int = 0,
    ) -> None:
        if max_models < 1:
            raise SoraiError(f"--max-models must be >= 1, got {max_models}")
        self._load = load
        self._size_of = size_of
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.keep_alive = keep_alive
        self.pinned = frozenset(pinned)
        self.default_size = default_size  # the first model's, always loaded
        self.loaded: dict[str, Loaded] = {}
        self._loading = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._unloads: set[asyncio.Task[None]] = set()
        self._started: list[str] = []

    # -- set-up and shutdown ----------------------------------------------------------------

    def add(self, name: str, engine: AsyncEngine) -> None:
        """A model loaded at start (`-m` after the first); its engine starts with the app."""
        self.loaded[name] = Loaded(
            name, engine, self._size_of(name), name in self.pinned, self.keep_alive
        )
        self._started.append(name)  # loaded again on demand after an unload, path or not

    async def start(self) -> None:
        for loaded in self.loaded.values():
            await loaded.engine.start()
        self._reaper = asyncio.create_task(self._reap_forever())

    async def stop(self, timeout: float) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(m.engine.stop(timeout=timeout) for m in self.loaded.values()))
        self.loaded.clear()

    # -- what can be served ---------------------------------------------------------------

    def cached(self) -> list[str]:
        """Chat models in the cache that a request may name to have them loaded."""
        cached = [e.name for e in hub.cached_entries() if e.kind == registry.MODEL]
        return list(dict.fromkeys(self._started + cached))

    async def acquire(self, name: str, keep_alive: float | None) -> Loaded:
        """The loaded model `name` (loading it first when it is cached), leased to one request
        until release()."""
        loaded = self.loaded.get(name)
        if loaded is None:
            async with self._loading:  # one load at a time: each takes the machine's cores
                loaded = self.loaded.get(name) or await self._load_on_demand(name)
        loaded.leases += 1
        loaded.last_used = time.monotonic()
        if keep_alive is not None:
            loaded.keep_alive = keep_alive
        return loaded

    def release(self, loaded: Loaded) -> None:
        loaded.leases -= 1
        loaded.last_used = time.monotonic()
        if loaded.leases == 0 and loaded.keep_alive == 0 and not loaded.pinned:
            self._unload_soon(loaded)

    # -- loading and unloading ------------------------------------------------------------

    async def _load_on_demand(self, name: str) -> Loaded:
        if name not in self.cached():
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves "
                + ", ".join(repr(n) for n in self.names())
                + " and loads on demand the chat models in its cache (sorai ls)",
                param="model",
                code="model_not_found",
            )
        size = self._size_of(name)
        await self._make_room(name, size)
        log.info("loading %s on demand", name)
        started = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self._load, name)
        except SoraiError as e:
            raise APIError(500, f"the model {name!r} could not be loaded: {e}") from None
        await engine.start()
        loaded = Loaded(name, engine, size, name in self.pinned, self.keep_alive)
        self.loaded[name] = loaded
        log.info("loaded %s in %.1fs", name, time.perf_counter() - started)
        return loaded

    def _used(self) -> tuple[int, int]:
        """(models loaded, bytes they take), the first model included."""
        sizes = [m.size for m in self.loaded.values()]
        return 1 + len(sizes), self.default_size + sum(sizes)

    async def _make_room(self, name: str, size: int) -> None:
        """Unload idle unpinned models, least recently used first, until `name` fits; their
        memory is given back before the new model loads."""
        while True:
            count, used = self._used()
            over_count = count + 1 > self.max_models
            over_bytes = self.max_bytes is not None and used + size > self.max_bytes
            if not (over_count or over_bytes):
                return
            idle = [m for m in self.loaded.values() if m.leases == 0 and not m.pinned]
            if not idle:
                why = (
                    f"--max-models {self.max_models}"
                    if over_count
                    else f"--max-memory-gib {self.max_bytes / 2**30:g}"
                )
                raise APIError(
                    503,
                    f"cannot load {name!r} now: {count} models are loaded ("
                    + ", ".join(self.names())
                    + f") and none is idle and unpinned to make room ({why}); retry later",
                    type="server_error",
                    code="model_capacity",
                    headers={"Retry-After": "5"},
                )
            victim = min(idle, key=lambda m: m.last_used)
            del self.loaded[victim.name]
            await self._stop(victim)

    def _unload_soon(self, loaded: Loaded) -> None:
        # Out of the table at once (no new request gets it); its engine stops in the background.
        if self.loaded.get(loaded.name) is not loaded:
            return
        del self.loaded[loaded.name]
        task = asyncio.get_running_loop().create_task(self._stop(loaded))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _stop(self, loaded: Loaded) -> None:
        await loaded.engine.stop(timeout=0)
        log.info("unloaded %s", loaded.name)
        del loaded
        gc.collect()
        from sorai.model.loader import release_free_memory

        release_free_memory()

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(_REAP_INTERVAL_S)
            now = time.monotonic()
            for loaded in list(self.loaded.values()):
                expired = loaded.idle_for(now) > loaded.keep_alive
                if loaded.leases == 0 and not loaded.pinned and expired:
                    self._unload_soon(loaded)

    def names(self) -> list[str]:
        return list(self.loaded)


async def route(
    request: Request, requested: str | None, keep_alive: object = None
) -> tuple[ServerState, str]:
    """The state a handler runs on for the `model` a request names, and the name to answer
    with: the server's own state for its first model; a copy over another model's engine,
    leased (loaded on demand) until the response has gone out (ModelLeases releases it)."""
    state = get_state(request)
    pool: ModelPool | None = getattr(state, "models", None)
    if pool is None or not requested or state.serves(requested) or state.is_adapter(requested):
        return state, state.resolve_model(requested)
    if state.embeddings is not None and requested == state.embeddings.name:
        return state, state.resolve_model(requested)  # its 404 says where to use it
    seconds = None
    if keep_alive is not None:
        try:
            seconds = parse_keep_alive(keep_alive)
        except SoraiError as e:
            raise APIError(400, str(e), param="keep_alive") from None
    # `hf:org/repo` and `org/repo` are one model (the registry's name).
    loaded = await pool.acquire(requested.removeprefix(hf.PREFIX), seconds)
    leases = request.scope.get(_LEASES)
    if leases is None:  # no ModelLeases around this app: nothing would release the lease
        pool.release(loaded)
    else:
        leases.append(loaded)
    view = copy.copy(state)
    view.engine = loaded.engine
    view.token_text = loaded.token_text
    view.adapters = None  # adapters run on the first model's engine only
    return view, requested


class ModelLeases:
    """ASGI middleware: the models a request leased are released once its response (a stream
    included) is over, however it ended."""

    def __init__(self, app: ASGIApp, pool: ModelPool) -> None:
        self.app = app
        self.pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[Loaded] = []
        scope[_LEASES] = leases
        try:
            await self.app(scope, receive, send)
        finally:
            for loaded in leases:
                self.pool.release(loaded)
