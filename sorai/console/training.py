"""/v1/sorai/training: the `sorai train` run directories under --runs-dir: their metrics.jsonl
(read again on every call, so the page's chart follows a run while it trains), config,
checkpoints, exports and the command that serves the result."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from sorai.console.settings import ConsoleSettings, child
from sorai.errors import SoraiError

router = APIRouter(prefix="/v1/sorai/training")
CONFIG = "config.yaml"
EXPORTS = ("adapter", "model")  # a LoRA adapter in PEFT format; a full HF model directory


def _root(request: Request) -> Path | None:
    settings: ConsoleSettings = request.app.state.console
    return settings.runs_dir


def _is_run(path: Path) -> bool:
    from sorai.train.metrics import METRICS_FILE

    return path.is_dir() and ((path / METRICS_FILE).is_file() or (path / CONFIG).is_file())


def _base_model(run: Path) -> str | None:
    import yaml

    try:
        config = yaml.safe_load((run / CONFIG).read_text("utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    model = config.get("model") if isinstance(config, dict) else None
    return str(model) if model else None


def serve_command(run: Path) -> str | None:
    """How to serve what the run exported (None before it exported anything)."""
    if (run / "model").is_dir():
        return f"sorai serve --model {shlex.quote(str(run / 'model'))}"
    if (run / "adapter").is_dir():
        base = _base_model(run) or "BASE_MODEL"
        return (
            f"sorai serve --model {shlex.quote(base)} --adapter {shlex.quote(str(run / 'adapter'))}"
        )
    return None


@router.get("")
async def list_runs(request: Request) -> JSONResponse:
    from sorai.train.metrics import METRICS_FILE

    root = _root(request)
    runs = [] if root is None else sorted(p for p in root.iterdir() if _is_run(p))
    items = [
        {
            "name": p.name,
            "model": _base_model(p),
            "modified": (p / METRICS_FILE).stat().st_mtime
            if (p / METRICS_FILE).is_file()
            else None,
        }
        for p in runs
    ]
    return JSONResponse({"object": "list", "data": items, "configured": root is not None})


@router.get("/{name}")
async def get_run(request: Request, name: str, after: int = 0) -> JSONResponse:
    """The run; its metric rows from the `after`-th on (the page asks only for new ones)."""
    from sorai.train.metrics import METRICS_FILE, read_metrics

    if after < 0:
        raise SoraiError(f"after must be >= 0, got {after}")
    run = child(_root(request), name, "training runs")
    rows = read_metrics(run / METRICS_FILE)
    checkpoints = run / "checkpoints"
    body: dict[str, Any] = {
        "name": name,
        "path": str(run),
        "metrics": rows[after:],
        "next": len(rows),
        "config": (run / CONFIG).read_text("utf-8") if (run / CONFIG).is_file() else None,
        "checkpoints": sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
        if checkpoints.is_dir()
        else [],
        "exports": [e for e in EXPORTS if (run / e).is_dir()],
        "serve": serve_command(run),
    }
    return JSONResponse(body)
