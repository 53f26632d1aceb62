"""python: run code in a separate, confined Python process (see sandbox_child.py for how).

The child is `sys.executable -I` (no PYTHONPATH, no user site) in its own session, with the
workspace as its working directory and HOME, a minimal environment, stdin closed after the
code is handed over, and a wall-clock limit after which its whole process group is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated

from pydantic import Field

from sorai.apps.agent.files import Workspace
from sorai.apps.agent.tools import MAX_OBSERVATION, Tool, tool

DEFAULT_SECONDS = 10.0
DEFAULT_MEMORY_MB = 1024
MAX_PROCESSES = 64  # processes and threads the code may add (root: no process at all)
MAX_CAPTURE = 64 * 1024  # bytes of each stream kept while the code runs
DRAIN_SECONDS = 5.0  # after the kill, for the output still in the pipes
RUN_MARK = "SORAI_SANDBOX_RUN"  # in each run's environment, to find what it left behind
_CHILD = (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")


@dataclass
class PythonRun:
    returncode: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    # The sandbox layers the child got (sandbox_child.py's names), "" if it died before saying.
    sandbox: str = ""

    def observation(self) -> str:
        parts = []
        if self.timed_out:
            parts.append(f"killed: the code ran past its time limit ({self.seconds:.1f} s)")
        elif self.returncode:
            parts.append(f"exit code {self.returncode}")
        # Both streams' ends fit the observation (cut at its end otherwise, the traceback on
        # stderr was lost behind a long stdout); stdout gets what stderr leaves.
        room = MAX_OBSERVATION - 100
        stderr = _cut(self.stderr, room // 2 if self.stdout else room)
        if self.stdout:
            parts.append(f"stdout:\n{_cut(self.stdout, room - len(stderr))}")
        if self.stderr:
            parts.append(f"stderr:\n{stderr}")
        parts = parts or ["(no output)"]
        # Which confinement held, so a trace shows what the code could and could not reach.
        parts.append(f"[sandbox: {self.sandbox or 'unknown'}]")
        return "\n".join(parts)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def run_python(
    code: str,
    workspace: Workspace,
    seconds: float = DEFAULT_SECONDS,
    memory_mb: int = DEFAULT_MEMORY_MB,
    report: bool = False,
    os_layers: bool = True,
) -> PythonRun:
    """Run `code` in the sandbox; never raises for what the code does. report: the child
    says on stderr which layers it got; os_layers=False leaves out the namespace and Landlock
    (what a kernel that allows neither gives), for testing that fallback."""
    config = {
        "code": code,
        "workspace": str(workspace.root),
        "memory_bytes": memory_mb * 2**20,
        "cpu_seconds": int(seconds) + 1,  # a second guard should the kill below be late
        "file_bytes": 256 * 2**20,
        "processes": MAX_PROCESSES,
        "os_layers": os_layers,
    }
    report_read, report_write = os.pipe()
    config["report_fd"] = report_write
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workspace.root),
        "TMPDIR": str(workspace.root),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OPENBLAS_NUM_THREADS": "1",  # BLAS threads reserve address space the limit counts
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "SORAI_SANDBOX_REPORT": "1" if report else "0",
        RUN_MARK: secrets.token_hex(16),
    }
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD],
            cwd=workspace.root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed whole at the limit
            pass_fds=(report_write,),
        )
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)
    # The pipes are read into bounded buffers: code printing in a loop would otherwise pile up
    # gigabytes in this process (communicate() keeps everything) before the time limit.
    out, err = _Capture(process.stdout), _Capture(process.stderr)
    # Once the child exits, what it left behind goes too: a daemon holding the pipes would
    # otherwise keep the readers waiting until the time limit.
    reaper = threading.Thread(target=_reap, args=(process, env[RUN_MARK]), daemon=True)
    reaper.start()
    with contextlib.suppress(BrokenPipeError, OSError):  # it died before reading: see stderr
        process.stdin.write(json.dumps(config).encode("utf-8"))
    with contextlib.suppress(OSError):
        process.stdin.close()  # the code's input() reads end of file
    try:
        process.wait(timeout=seconds)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(process)
        _kill_marked(env[RUN_MARK])
        timed_out = True
        process.wait()
    # A process it started that left the group and cleared its environment may hold the pipes
    # open: what was read by then is taken rather than hang the agent.
    stdout, stderr = out.text(DRAIN_SECONDS), err.text(DRAIN_SECONDS)
    if out.thread.is_alive() or err.thread.is_alive():
        stderr += "\n(output cut: a process the code started still holds it)"
    return PythonRun(
        None if timed_out else process.returncode,
        stdout,
        stderr,
        time.monotonic() - started,
        timed_out,
        _read_report(report_read),
    )


def _read_report(fd: int) -> str:
    """The layers line the child wrote before the code ran (it closed its end then, and the
    process is over: the read does not wait on anyone)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    except OSError:  # BlockingIOError: nothing was written
        return ""
    finally:
        os.close(fd)


class _Capture:
    """Reads a pipe to its end in a thread, keeping only the last MAX_CAPTURE bytes."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.pipe = pipe
        self.data = bytearray()
        self.dropped = 0
        self.thread = threading.Thread(target=self._read, daemon=True, name="sorai-python-out")
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.pipe.read1(65536):
                self.data += chunk
                if len(self.data) > MAX_CAPTURE:
                    excess = len(self.data) - MAX_CAPTURE
                    del self.data[:excess]
                    self.dropped += excess

    def text(self, wait: float) -> str:
        """What was read by the pipe's end, or after `wait` seconds if it is held open."""
        self.thread.join(wait)
        text = bytes(self.data).decode("utf-8", errors="replace")
        if self.dropped:
            text = f"[{self.dropped} bytes before this cut]\n" + text
        return text


def _reap(process: subprocess.Popen, mark: str) -> None:
    process.wait()
    _kill_marked(mark)


def _kill_marked(mark: str) -> None:
    """Kill every process whose environment carries this run's mark: those that left the
    process group (setsid, a double fork) but kept the environment they inherited."""
    needle = f"{RUN_MARK}={mark}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, another user's, or no /proc (not Linux)
            continue
        if needle in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.killpg(process.pid, signal.SIGKILL)


def python_tool(
    workspace: Workspace, seconds: float = DEFAULT_SECONDS, memory_mb: int = DEFAULT_MEMORY_MB
) -> Tool:
    def python(
        code: Annotated[
            str, Field(description="Python 3 source; print() what you need", min_length=1)
        ],
    ) -> str:
        """Run Python code in a sandbox (the workspace is its working directory and the only
        place it may write; no network) and return its printed output."""
        return run_python(code, workspace, seconds, memory_mb).observation()

    # The tool's own limit sits above the process's, so the kill, not the thread, ends it.
    return tool(python, timeout=seconds + 10)
