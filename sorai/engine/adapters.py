"""The engine's LoRA adapters: which are known by name, which hold one of the max_loras slots.

An adapter is registered (read from disk and checked) under a name; requests naming it keep
it alive while they run, even if it is removed meanwhile (they are its `users`). A request
takes a slot when the scheduler admits it: the adapter's slot if it has one, else a free one,
else the least recently used slot whose adapter no admitted request uses (evicted: its weights
stay registered, in host memory, and return to a slot on demand). When no slot can be had the
request waits. Thread-safe: the server registers and removes from its own thread while the
engine thread schedules.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from sorai.errors import SoraiError
from sorai.model.lora import AdapterFile, LoRAError, linear_shapes, read_adapter
from sorai.model.multi_lora import MultiLoRA
from sorai.model.transformer import Transformer

_uids = itertools.count(1)


class AdapterNotFoundError(SoraiError, LookupError):
    """A request names an adapter that is not loaded."""


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: Path
    file: AdapterFile
    uid: int = field(default_factory=lambda: next(_uids))
    slot: int = -1
    users: int = 0  # requests naming it, from add_request to their end
    admitted: int = 0  # of those, the ones the scheduler admitted (they hold the slot)
    removed: bool = False

    @property
    def cache_salt(self) -> bytes:
        """What sets its KV blocks apart in the prefix cache (a reload is a new adapter)."""
        return f"lora:{self.uid}:".encode()


class AdapterRegistry:
    def __init__(self, model: Transformer, max_loras: int, max_lora_rank: int) -> None:
        # Both bounds are checked by EngineConfig, the one place they come from.
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self._shapes = linear_shapes(model)
        self._lora: MultiLoRA | None = None  # hooks go in with the first adapter
        self._lock = threading.Lock()
        self._by_name: dict[str, AdapterEntry] = {}
        self._slots: list[AdapterEntry | None] = [None] * max_loras
        self._lru: OrderedDict[int, None] = OrderedDict()  # slots, least recently used first

    @property
    def lora(self) -> MultiLoRA | None:
        return self._lora

    # -- names (any thread) ---------------------------------------------------------------

    def read(self, path: str | os.PathLike) -> AdapterFile:
        """Read and check an adapter for this model (LoRAError naming why it does not fit)."""
        file = read_adapter(path, self._shapes)
        if file.rank > self.max_lora_rank:
            raise LoRAError(
                f"{file.path}: rank {file.rank} is above the largest this engine serves "
                f"(max_lora_rank {self.max_lora_rank}; sorai serve --max-lora-rank)"
            )
        return file

    def add(self, name: str, path: str | os.PathLike, file: AdapterFile | None = None) -> None:
        """Register `path` as `name` (replacing what the name meant; requests already
        running keep the old one)."""
        check_name(name)
        file = file or self.read(path)
        entry = AdapterEntry(name, Path(path), file)
        with self._lock:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._drop(old)
            self._by_name[name] = entry

    def remove(self, name: str) -> None:
        with self._lock:
            entry = self._by_name.pop(name, None)
            if entry is None:
                raise AdapterNotFoundError(f"no adapter named {name!r} is loaded")
            self._drop(entry)

    def names(self) -> dict[str, Path]:
        with self._lock:
            return {name: entry.path for name, entry in self._by_name.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def check(self, name: str) -> None:
        """AdapterNotFoundError unless `name` is loaded."""
        with self._lock:
            self._get(name)

    def use(self, name: str) -> AdapterEntry:
        """The entry a new request runs with; it stays alive until release()."""
        with self._lock:
            entry = self._get(name)
            entry.users += 1
            return entry

    def _get(self, name: str) -> AdapterEntry:
        entry = self._by_name.get(name)
        if entry is None:
            known = ", ".join(repr(n) for n in self._by_name) or "none"
            raise AdapterNotFoundError(
                f"no adapter named {name!r} is loaded (loaded: {known})", param="model"
            )
        return entry

    def _drop(self, entry: AdapterEntry) -> None:
        entry.removed = True
        if entry.users == 0:
            self._free_slot(entry)

    # -- slots (the engine thread) --------------------------------------------------------

    def admit(self, entry: AdapterEntry) -> bool:
        """Give an admitted request's adapter a slot; False when every slot is busy."""
        with self._lock:
            if entry.slot < 0:
                slot = self._take_slot()
                if slot is None:
                    return False
                if self._lora is None:
                    self._lora = MultiLoRA(self.model, self.max_loras, self.max_lora_rank)
                self._lora.load(slot, entry.file)
                self._slots[slot], entry.slot = entry, slot
            entry.admitted += 1
            self._lru[entry.slot] = None
            self._lru.move_to_end(entry.slot)
            return True

    def release(self, entry: AdapterEntry, admitted: bool) -> None:
        """A request that named the adapter ended (admitted: it had taken the slot)."""
        with self._lock:
            entry.users -= 1
            if admitted:
                entry.admitted -= 1
            if entry.removed and entry.users == 0:
                self._free_slot(entry)

    def _take_slot(self) -> int | None:
        for slot, holder in enumerate(self._slots):
            if holder is None:
                return slot
        for slot in self._lru:
            holder = self._slots[slot]
            if holder is not None and holder.admitted == 0:
                self._free_slot(holder)
                return slot
        return None

    def _free_slot(self, entry: AdapterEntry) -> None:
        if entry.slot >= 0:
            self._slots[entry.slot] = None
            self._lru.pop(entry.slot, None)
            if self._lora is not None:
                self._lora.clear(entry.slot)
            entry.slot = -1

    def resident(self) -> dict[str, int]:
        """{adapter name: slot} of the adapters holding a slot (for tests and metrics)."""
        with self._lock:
            return {e.name: i for i, e in enumerate(self._slots) if e is not None}


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "+" in name or "/" in name or name != name.strip():
        raise LoRAError(
            f"adapter name {name!r} is not usable: give a non-empty name without '+', '/' or "
            "surrounding spaces (requests name it as BASE+NAME)"
        )
