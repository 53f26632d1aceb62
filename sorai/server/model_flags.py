"""`sorai serve`'s flags for several models (`-m A -m B`, --max-models, --max-memory-gib,
--keep-alive, --pin): added to its parser, checked before anything loads, made a ModelPool."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from sorai import hub, registry
from sorai.errors import SoraiError

if TYPE_CHECKING:
    from sorai.engine.async_engine import AsyncEngine
    from sorai.server.models import ModelPool


def add(parser: argparse.ArgumentParser) -> None:
    """`sorai serve`'s several models: how many stay loaded, and for how long."""
    group = parser.add_argument_group("several models (-m A -m B, or loaded on demand)")
    group.add_argument(
        "--max-models",
        type=int,
        default=None,
        metavar="N",
        help="models loaded at once; with room beyond the -m models, a request naming a chat "
        "model of the cache (sorai ls) loads it, unloading the least recently used idle one "
        "when full (default: the number of -m models)",
    )
    group.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="memory budget of the loaded models (their files plus KV cache each); loading "
        "one more unloads idle ones to fit (default: no budget)",
    )
    group.add_argument(
        "--keep-alive",
        default="5m",
        metavar="DURATION",
        help="how long a model other than the first stays loaded after its last request: "
        "seconds or 30s, 5m, 1h; 0 unloads at once, negative never; a request's `keep_alive` "
        "field overrides it (default: %(default)s)",
    )
    group.add_argument(
        "--pin",
        action="append",
        default=None,
        metavar="NAME",
        help="never unload this model (repeatable; the first -m model never unloads)",
    )


def check(args: argparse.Namespace, models: list[str]) -> None:
    """Fail on a bad flag before anything loads."""
    # Imported here: the parser is built for every verb, the server stack only serves.
    from sorai.server.models import parse_keep_alive

    parse_keep_alive(args.keep_alive, "--keep-alive")
    if args.max_models is not None and args.max_models < len(models):
        raise SoraiError(
            f"--max-models {args.max_models} is fewer than the {len(models)} -m models; give "
            f"at least {len(models)}"
        )
    if args.max_memory_gib is not None and not 0 < args.max_memory_gib < math.inf:
        raise SoraiError(f"--max-memory-gib must be a number > 0, got {args.max_memory_gib:g}")


def pool(
    args: argparse.Namespace,
    models: list[str],
    load: Callable[[str], AsyncEngine],
    kv_bytes: int,
) -> ModelPool | None:
    """The ModelPool of `sorai serve -m A -m B` (or --max-models N), None for one model."""
    from sorai.server.models import ModelPool, parse_keep_alive

    max_models = args.max_models if args.max_models is not None else len(models)
    if max_models == 1 and args.max_memory_gib is None:
        return None
    keep_alive = parse_keep_alive(args.keep_alive, "--keep-alive")

    def size_of(name: str) -> int:
        path = hub.local_path(name)
        return (registry.disk_size(path) if path is not None else 0) + kv_bytes

    budget = args.max_memory_gib
    return ModelPool(
        load,
        size_of,
        max_models=max_models,
        max_bytes=int(budget * 2**30) if budget is not None else None,
        keep_alive=keep_alive,
        pinned=args.pin or (),
        default_size=size_of(models[0]),
    )
