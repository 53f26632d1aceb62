"""Pieces the benchmark scripts share (stdlib only: a script may run it in a peer's venv)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import IO, Any


def peer_environment() -> dict[str, str]:
    """os.environ for a peer's process (llama.cpp), without the OpenMP wait policy that
    `import sorai` sets for its own threads: each side runs with its own defaults."""
    import sys

    openmp = sys.modules.get("sorai.openmp")
    return openmp.peer_environment(os.environ) if openmp else dict(os.environ)


def without_nan(value: Any) -> Any:
    """`value` with NaN floats as None, so the JSON file is standard JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value


def run_logged(
    command: list[str],
    out: IO[str],
    label: str,
    started: float,
    env: Mapping[str, str] | None = None,
    note: Callable[[], str] = lambda: "",
    doing: str = "installing",
    nice: int = 0,
    cwd: str | None = None,
) -> bool:
    """Run one install or build step with its output in `out`, printing "<label>: <doing>
    (N s)" every 30 s (plus `note()`), so a long build does not look hung; True when it
    succeeds. `nice` > 0 runs the step at that lower priority (a build on a shared machine)."""
    out.write(f"$ {' '.join(command)}\n")
    out.flush()
    process = subprocess.Popen(
        command,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        preexec_fn=(lambda: os.nice(nice)) if nice > 0 else None,  # noqa: PLW1509 - no threads
    )
    next_note = time.monotonic() + 30
    try:
        while process.poll() is None:
            time.sleep(1)
            if time.monotonic() >= next_note:
                next_note += 30
                elapsed = time.monotonic() - started
                print(f"  {label}: {doing} ({elapsed:.0f} s) {note()}".rstrip(), flush=True)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait()
    return process.returncode == 0


def cpu_flags() -> str:
    """The CPU's vector flags that matter for the figures (avx2, avx512*, amx*), from /proc."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = [f for f in flags if f == "avx2" or f.startswith(("avx512", "amx"))]
                    return " ".join(sorted(keep)) or "(no avx2)"
    except OSError:
        pass
    return "(unknown)"
