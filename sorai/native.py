"""Small C kernels built on the user's machine: compiled once per machine with the system's C
compiler (`-O3 -march=native`) into SORAI_HOME/kernels and loaded with ctypes.

A kernel's Python side asks `load(source)` for its library and falls back to PyTorch's ops
where it gets None: no compiler, a failed build, or SORAI_NATIVE=off (which turns every such
kernel off, for comparing numbers against PyTorch's own).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from sorai.errors import SoraiError

ENVIRONMENT = "SORAI_NATIVE"
CHOICES = ("auto", "off")
FLAGS = ("-O3", "-funroll-loops", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC")

log = logging.getLogger(__name__)


# What a failed build or load raises: no compiler, a compiler error, an unloadable library.
FAILURES = (OSError, subprocess.SubprocessError, SoraiError)


def choice(variable: str, choices: tuple[str, ...]) -> str:
    """The environment variable's value among `choices` (the first when unset or empty); a
    SoraiError naming the variable and the choices for anything else."""
    value = os.environ.get(variable, choices[0]).strip().lower() or choices[0]
    if value not in choices:
        raise SoraiError(f"{variable} must be one of {', '.join(choices)}, got {value!r}")
    return value


def enabled() -> bool:
    """Whether SORAI_NATIVE lets native kernels run (auto, the default) or not (off)."""
    return choice(ENVIRONMENT, CHOICES) == "auto"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def machine_key(source: Path, compiler: str) -> str:
    """What a built library depends on: the source, flags, compiler and CPU (-march=native)."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update(_machine(compiler).encode())
    return digest.hexdigest()[:16]


@functools.cache
def _machine(compiler: str) -> str:
    """The flags, the compiler's version and the CPU: asked once per process, not per kernel."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    described = " ".join((compiler, *FLAGS, platform.machine())) + version.stdout
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        described += "".join(sorted({x for x in lines if x.startswith(("flags", "model name"))}))
    return described


def build(source: Path) -> Path:
    """The shared library built from `source` for this machine (built now unless cached);
    SoraiError naming the problem where it cannot be built."""
    from sorai.hub import sorai_home

    cc = compiler()
    if not cc:
        raise SoraiError(f"no C compiler found (cc, gcc or $CC) to build {source.name}")
    folder = sorai_home() / "kernels"
    library = folder / f"{source.stem}-{machine_key(source, cc)}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: processes starting together never load half a file.
    fd, partial = tempfile.mkstemp(dir=folder, suffix=".so.partial")
    os.close(fd)
    try:
        run = subprocess.run(
            [cc, *FLAGS, "-o", partial, str(source)], capture_output=True, text=True, timeout=120
        )
        if run.returncode:
            raise SoraiError(f"{cc} could not build {source.name}: {run.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    finally:
        Path(partial).unlink(missing_ok=True)
    # Builds of this source's other versions, flags or CPUs are stale (a process still running
    # one keeps its mapping: on Linux the file goes when the last user unmaps it).
    for old in folder.glob(f"{source.stem}-*.so"):
        if old != library:
            old.unlink(missing_ok=True)
    return library


@functools.cache
def load(source: Path) -> ctypes.CDLL | None:
    """The library built from `source`, or None (logged once) where SORAI_NATIVE=off or it
    cannot be built: the caller then runs PyTorch's ops."""
    if not enabled():
        return None
    try:
        return ctypes.CDLL(str(build(source)))
    except FAILURES as error:
        log.warning("%s is not used, PyTorch's ops run instead: %s", source.name, error)
        return None
