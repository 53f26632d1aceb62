"""`sorai serve`'s console flags, and the console they describe as an app extension."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_serve_args(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("web console (at / on the same address)")
    group.add_argument(
        "--no-console", action="store_true", help="serve the API only, no console at /"
    )
    group.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a `sorai index` file the console's Data page searches and asks (repeatable)",
    )
    group.add_argument(
        "--eval-dir", metavar="DIR", help="the console lists the `sorai eval run` runs in DIR"
    )
    group.add_argument(
        "--runs-dir", metavar="DIR", help="the console lists the `sorai train` runs in DIR"
    )
    group.add_argument(
        "--trace-dir",
        metavar="DIR",
        help="where the console's agent runs save traces, and which it lists "
        "(default: $SORAI_HOME/agent/traces)",
    )


def extension(args: argparse.Namespace) -> Callable[[Any], object] | None:
    """What adds the console to the app (None with --no-console); the flags are checked now,
    before the model loads."""
    if args.no_console:
        return None
    from sorai.console.settings import ConsoleSettings, existing_dir, parse_indexes

    settings = ConsoleSettings(
        indexes=parse_indexes(args.index),
        eval_dir=existing_dir("--eval-dir", args.eval_dir),
        runs_dir=existing_dir("--runs-dir", args.runs_dir),
        trace_dir=existing_dir("--trace-dir", args.trace_dir),
    )

    def install(app: Any) -> object:
        from sorai.console.app import install

        return install(app, settings)

    return install
