"""llama.cpp's own `llama-server` and `llama-bench`, built from source once, for the benchmarks.

    python benchmarks/llama_cpp.py          # build (or find) them and print where they are

The source is llama.cpp as vendored by the llama-cpp-python sdist on PyPI (pinned below, so
every run measures the same peer); it is built with cmake for this machine's CPU (GGML_NATIVE)
into ~/.cache/sorai/bench/llama.cpp-<version>/ and reused by later runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

SDIST_VERSION = "0.3.36"  # llama-cpp-python, whose vendor/llama.cpp is built
CACHE = Path(os.environ.get("SORAI_BENCH_CACHE", "~/.cache/sorai/bench")).expanduser()
TARGETS = ("llama-server", "llama-bench")


@dataclass(frozen=True)
class LlamaCpp:
    bin_dir: Path
    version: str  # llama.cpp's commit or build number, as the build reports it

    @property
    def server(self) -> Path:
        return self.bin_dir / "llama-server"

    @property
    def bench(self) -> Path:
        return self.bin_dir / "llama-bench"


def _say(message: str) -> None:
    print(f"  llama.cpp: {message}", flush=True)


def _run(command: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(
            f"llama.cpp build step failed ({command[0]} exit {done.returncode}); log: {log}\n"
            + "\n".join(tail)
        )


def _version(source: Path) -> str:
    for name in ("build-info.txt",):
        if (source / name).exists():
            return (source / name).read_text().strip()
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    return f"vendored in llama-cpp-python {SDIST_VERSION}"


def ensure_llama_cpp(cache: Path = CACHE) -> LlamaCpp:
    """The built binaries, building them first if this cache has none."""
    root = cache / f"llama.cpp-{SDIST_VERSION}"
    bin_dir = root / "build" / "bin"
    version_file = root / "VERSION"
    if all((bin_dir / t).exists() for t in TARGETS) and version_file.exists():
        return LlamaCpp(bin_dir, version_file.read_text().strip())
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama.cpp needs {tool}, which is not on PATH")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    started = time.monotonic()
    sdist = next(root.glob("llama_cpp_python-*.tar.gz"), None)
    if sdist is None:
        _say(f"downloading the llama-cpp-python {SDIST_VERSION} sdist (its vendored llama.cpp)")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        _run([*pip, f"llama-cpp-python=={SDIST_VERSION}", "-d", str(root)], log)
        sdist = next(root.glob("llama_cpp_python-*.tar.gz"))
    source = root / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        _say("extracting vendor/llama.cpp")
        with tarfile.open(sdist) as tar:
            prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(source, members=[m for m in members if m.name], filter="data")
    build = root / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _say(f"configuring (log: {log})")
    _run(
        [
            "cmake", "-S", str(source), "-B", str(build), *generator,
            "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DBUILD_SHARED_LIBS=OFF",
        ],
        log,
    )  # fmt: skip
    _say(f"building {', '.join(TARGETS)} on {os.cpu_count()} cores (many minutes on 2 cores)")
    jobs = str(os.cpu_count() or 2)
    _run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", jobs], log)
    version_file.write_text(_version(source) + "\n")
    _say(f"built in {time.monotonic() - started:.0f} s: {bin_dir}")
    return LlamaCpp(bin_dir, version_file.read_text().strip())


if __name__ == "__main__":
    built = ensure_llama_cpp()
    print(f"llama-server: {built.server}\nllama-bench: {built.bench}\nversion: {built.version}")
