"""The engine's LoRA adapters: which are known by name, which hold one of the max_loras slots.

An adapter is registered (read from disk and checked) under a name; requests naming it keep
it alive while they run, even if it is removed meanwhile (they are its `users`). A request
takes a slot when the scheduler admits it: the adapter's slot if it has one, else a free one,
else the least recently used slot whose adapter no admitted request uses (evicted: its weights
stay registered, in host memory, and return to a slot on demand). With a budget in bytes
(max_lora_bytes, counted as the slots store them: sorai.model.multi_lora.slot_bytes) idle
adapters are evicted the same way until the new one's bytes fit too. When no slot can be had
the request waits. Thread-safe: the server registers and removes from its own thread while the
engine thread schedules.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from sorai.errors import SoraiError
from sorai.model.lora import CONFIG_FILE, AdapterFile, LoRAError, linear_shapes, read_adapter
from sorai.model.multi_lora import MultiLoRA, slot_bytes
from sorai.model.transformer import Transformer

log = logging.getLogger("sorai.engine")
_uids = itertools.count(1)
# A quantization suffix of a model file's name (SmolLM2-135M-Instruct.Q4_1, ...-Q4_K_M).
_QUANT_SUFFIX = re.compile(r"[.-](?:i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)


class AdapterNotFoundError(SoraiError, LookupError):
    """A request names an adapter that is not loaded."""


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: Path
    file: AdapterFile
    num_bytes: int  # what its slot holds (sorai.model.multi_lora.slot_bytes)
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
    def __init__(
        self,
        model: Transformer,
        max_loras: int,
        max_lora_rank: int,
        max_lora_bytes: int | None = None,
        base_name: str = "",
    ) -> None:
        # The bounds are checked by EngineConfig, the one place they come from.
        self.model = model
        self.base_name = base_name  # the served model as named (its adapters' base), or ""
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_lora_bytes = max_lora_bytes
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
        self._check_base(file)
        if file.rank > self.max_lora_rank:
            raise LoRAError(
                f"{file.path}: rank {file.rank} is above the largest this engine serves "
                f"(max_lora_rank {self.max_lora_rank}; sorai serve --max-lora-rank)"
            )
        size = self.slot_bytes(file)
        if self.max_lora_bytes is not None and size > self.max_lora_bytes:
            raise LoRAError(
                f"{file.path}: its slot takes {_mib(size)} (float32, rank padded to "
                f"max_lora_rank {self.max_lora_rank}), above the adapter memory budget of "
                f"{_mib(self.max_lora_bytes)} (sorai serve --max-lora-bytes)"
            )
        return file

    def _check_base(self, file: AdapterFile) -> None:
        """The adapter's base model, when its config names one, is the served model (the
        shapes already fit: read_adapter checked them)."""
        try:
            base = json.loads((file.path / CONFIG_FILE).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            return  # read_adapter read it: only a race could get here; shapes decide
        if not isinstance(base, str) or not base.strip() or not self.base_name:
            return
        if same_model(base, self.base_name):
            return
        if _is_local_path(base) or _is_local_path(self.base_name):
            # Trained over a local copy (a merged or converted model, say), or served from one
            # (`sorai serve -m /models/llama`): a path's name cannot tell whether it is the
            # other model, and the shapes fit.
            log.warning(
                "LoRA adapter %s was trained on %s, this server serves %s (a local path on one "
                "side); its shapes fit, so it is served",
                file.path,
                base,
                self.base_name,
            )
            return
        raise LoRAError(
            f"{file.path}: trained on {base!r} (its base_model_name_or_path), but this server "
            f"serves {self.base_name!r}; serve it over {base!r}"
        )

    def slot_bytes(self, file: AdapterFile) -> int:
        """Bytes the adapter takes in a slot, what max_lora_bytes counts."""
        return slot_bytes(file, self._shapes, self.max_lora_rank)

    def add(self, name: str, path: str | os.PathLike, file: AdapterFile | None = None) -> None:
        """Register `path` as `name` (replacing what the name meant; requests already
        running keep the old one)."""
        check_name(name)
        file = file or self.read(path)
        entry = AdapterEntry(name, Path(path), file, self.slot_bytes(file))
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
                slot = self._take_slot(entry)
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

    def _take_slot(self, entry: AdapterEntry) -> int | None:
        """A free slot for `entry`, evicting idle adapters (least recently used first) until
        one is free and its bytes fit the budget; None, evicting nothing, when they cannot."""
        free = [slot for slot, holder in enumerate(self._slots) if holder is None]
        over = 0  # bytes to free
        if self.max_lora_bytes is not None:
            over = self.resident_bytes() + entry.num_bytes - self.max_lora_bytes
        evict: list[AdapterEntry] = []
        for slot in self._lru:
            if free and over <= 0:
                break
            holder = self._slots[slot]
            if holder is not None and holder.admitted == 0:
                evict.append(holder)
                free.append(slot)
                over -= holder.num_bytes
        if not free or over > 0:
            return None
        for holder in evict:
            self._free_slot(holder)
        return min(free)  # lowest first: the stacks hold up to the highest slot taken

    def _free_slot(self, entry: AdapterEntry) -> None:
        if entry.slot >= 0:
            self._slots[entry.slot] = None
            self._lru.pop(entry.slot, None)
            if self._lora is not None:
                self._lora.clear(entry.slot)
            entry.slot = -1

    def resident_bytes(self) -> int:
        """Bytes the adapters holding a slot take (the budget's count)."""
        return sum(e.num_bytes for e in self._slots if e is not None)

    def resident(self) -> dict[str, int]:
        """{adapter name: slot} of the adapters holding a slot (for tests and metrics)."""
        with self._lock:
            return {e.name: i for i, e in enumerate(self._slots) if e is not None}


def same_model(a: str, b: str) -> bool:
    """Whether two model names (a known name, hf:ORG/REPO[@rev], an HF repository id, a path,
    a GGUF file) name the same model: their last components, less a quantization suffix (a
    heuristic: it errs towards the same, since the shapes were checked already)."""
    return _model_key(a) == _model_key(b)


def _model_key(name: str) -> str:
    # A served name may carry a merged adapter (MODEL+NAME): its base is MODEL.
    text = name.strip().removeprefix("hf:").split("@", 1)[0].split("+", 1)[0].rstrip("/\\")
    last = re.split(r"[/\\]", text)[-1].lower().removesuffix(".gguf")
    return _QUANT_SUFFIX.sub("", last)


def _is_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.path.isabs(name) or Path(name).exists()


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB ({size} bytes)"


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "+" in name or "/" in name or name != name.strip():
        raise LoRAError(
            f"adapter name {name!r} is not usable: give a non-empty name without '+', '/' or "
            "surrounding spaces (requests name it as BASE+NAME)"
        )
