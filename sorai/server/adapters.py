"""LoRA adapters at runtime: vLLM's load/unload endpoints and the --adapter-dir watcher.

Requests run an adapter by naming `BASE+NAME` as their model. Adapters come from --adapter
NAME=PATH, from the PEFT adapter directories under --adapter-dir (rescanned periodically and
whenever a request names an adapter not known yet), and from POST /v1/load_lora_adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from sorai.errors import SoraiError
from sorai.model.lora import CONFIG_FILE, WEIGHTS_FILE, adapter_name
from sorai.server.body import read_json
from sorai.server.errors import APIError, bad_request
from sorai.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from sorai.server.state import ServerState, get_state

if TYPE_CHECKING:
    from sorai.engine.adapters import AdapterRegistry

log = logging.getLogger("sorai.server")
router = APIRouter()
# Per registry, the --adapter-dir adapters refused, by their files' (mtime, size): a refused one
# is logged once, not at every rescan, and tried again once its files change.
_refused: weakref.WeakKeyDictionary[AdapterRegistry, dict[Path, tuple]] = (
    weakref.WeakKeyDictionary()
)


def _registry(request: Request) -> AdapterRegistry:
    adapters = get_state(request).adapters
    if adapters is None:
        raise APIError(400, "this server's engine does not serve LoRA adapters")
    return adapters


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    registry = _registry(request)
    body = await read_json(request, LoadLoRAAdapterRequest)
    if body.lora_name in registry:
        raise bad_request(
            f"an adapter named {body.lora_name!r} is already loaded; unload it first",
            "lora_name",
        )
    try:
        # Reading and checking the files takes a while; the engine keeps stepping meanwhile.
        await asyncio.to_thread(registry.add, body.lora_name, body.lora_path)
    except SoraiError as exc:
        raise bad_request(str(exc), "lora_path") from None
    log.info("loaded LoRA adapter %s from %s", body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    registry = _registry(request)
    body = await read_json(request, UnloadLoRAAdapterRequest)
    try:
        registry.remove(body.lora_name)
    except SoraiError as exc:
        raise APIError(404, str(exc), param="lora_name", code="model_not_found") from None
    log.info("unloaded LoRA adapter %s", body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def scan_adapter_dir(registry: AdapterRegistry, directory: Path) -> list[str]:
    """Register every PEFT adapter under `directory` not known yet (by path); returns the
    names added. One that does not fit this model is logged and skipped, not fatal (and not
    logged again until its files change)."""
    known = {path.resolve() for path in registry.names().values()}
    refused = _refused.setdefault(registry, {})
    added = []
    for config in sorted(directory.rglob(CONFIG_FILE)):
        path = config.parent
        if path.resolve() in known:
            continue
        name = adapter_name(path)
        if name in registry:
            continue
        files = _files_state(path)
        if refused.get(path.resolve()) == files:
            continue
        try:
            registry.add(name, path)
        except SoraiError as exc:
            refused[path.resolve()] = files
            log.warning("skipping adapter %s: %s", path, exc)
            continue
        refused.pop(path.resolve(), None)
        added.append(name)
    return added


def _files_state(path: Path) -> tuple:
    """(mtime, size) of an adapter directory's two files: what tells that they changed."""
    state = []
    for file in (path / CONFIG_FILE, path / WEIGHTS_FILE):
        try:
            stat = file.stat()
        except OSError:
            state.append(None)
        else:
            state.append((stat.st_mtime_ns, stat.st_size))
    return tuple(state)


async def watch_adapter_dir(registry: AdapterRegistry, directory: Path, interval: float) -> None:
    """Rescan `directory` every `interval` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(OSError):
            added = await asyncio.to_thread(scan_adapter_dir, registry, directory)
            if added:
                log.info("new LoRA adapters in %s: %s", directory, ", ".join(added))


def start_watching(state: ServerState) -> asyncio.Task[None] | None:
    """Scan --adapter-dir now and start its periodic rescan (None without one)."""
    directory = state.settings.adapter_dir
    if directory is None or state.adapters is None:
        return None
    added = scan_adapter_dir(state.adapters, directory)
    if added:
        log.info("LoRA adapters in %s: %s", directory, ", ".join(added))
    interval = state.settings.adapter_scan_interval
    return asyncio.create_task(watch_adapter_dir(state.adapters, directory, interval))
