"""llama.cpp's own `llama-server` and `llama-bench`, built from source once, for the benchmarks.

    python benchmarks/llama_cpp_peer.py     # build them (or find them built) and say where

The source is the llama.cpp that the llama-cpp-python sdist on PyPI vendors (the sdist pinned
below, so every run measures the same peer; its changelog names the llama.cpp commit). It is
built with cmake for this machine's CPU (GGML_NATIVE, Release, no CURL, only the two targets),
under `nice`, into ~/.cache/sorai/bench/llama.cpp-<sdist version>/ and reused by later runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import run_logged  # benchmarks/common.py: the script's folder is on sys.path

SDIST_VERSION = "0.3.36"  # llama-cpp-python, whose vendor/llama.cpp is built
CACHE = Path(os.environ.get("SORAI_BENCH_CACHE", "~/.cache/sorai/bench")).expanduser()
TARGETS = ("llama-server", "llama-bench")
NICE = 15  # the build yields the cores to whatever else runs (other benchmarks, tests)
LABEL = "llama.cpp"


class BuildError(RuntimeError):
    """A step of the llama.cpp build failed; the message is one line naming the step and log."""


@dataclass(frozen=True)
class LlamaCpp:
    bin_dir: Path
    version: str  # "<llama.cpp commit> (vendored by llama-cpp-python <sdist version>)"

    @property
    def server(self) -> Path:
        return self.bin_dir / "llama-server"

    @property
    def bench(self) -> Path:
        return self.bin_dir / "llama-bench"


def _say(message: str) -> None:
    print(f"  {LABEL}: {message}", flush=True)


def cores() -> int:
    """Cores this process may run on (`nproc`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_warning() -> str:
    """A warning line where the machine runs more than it has cores, else ""."""
    load, n = os.getloadavg()[0], cores()
    if load <= n - 0.5:
        return ""
    return (
        f"WARNING: load average {load:.1f} on {n} cores: llama.cpp's threads spin-wait for each "
        "other and slow down many times over when they share the cores (-t 1 may then beat "
        f"-t {n}); compare peers only on a quiet machine"
    )


def build_progress(log: Path) -> str:
    """The build's last step ("step [34/210]") from its log, for the progress lines."""
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").splitlines()[-50:]
        for line in reversed(lines):
            step = line.strip().split(" ", 1)[0]
            if step.startswith("[") and step.endswith("]") and "/" in step:
                return f"step {step}"
    return ""


def _first_error(log: Path, start: int) -> str:
    """The first compiler or cmake error line written to `log` after byte `start`."""
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        f.seek(start)
        for line in f:
            if "error" in line.lower() and not line.startswith("$ "):
                return line.strip()[:160]
    return ""


def _run(command: list[str], log: Path, started: float, doing: str, nice: int = 0) -> None:
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a") as out:
        ok = run_logged(
            command, out, LABEL, started, note=lambda: build_progress(log), doing=doing, nice=nice
        )
    if not ok:
        detail = _first_error(log, start)
        raise BuildError(
            f"llama.cpp build failed while {doing} ({Path(command[0]).name}); log: {log}"
            + (f"; first error: {detail}" if detail else "")
        )


def vendored_commit(root: Path) -> str:
    """The llama.cpp commit the sdist vendors, from its changelog ("" where it names none)."""
    changelog = root / "CHANGELOG.md"
    if not changelog.exists():
        sdist = next(root.glob("llama_cpp_python-*.tar.gz"), None)
        if sdist is None:
            return ""
        with tarfile.open(sdist) as tar:
            member = tar.extractfile(f"llama_cpp_python-{SDIST_VERSION}/CHANGELOG.md")
            if member is None:
                return ""
            changelog.write_bytes(member.read())
    text = changelog.read_text(errors="replace")
    # "## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098"
    section = text.partition(f"## [{SDIST_VERSION}]")[2].split("\n## [", 1)[0]
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return found.group(1) if found else ""


def cpu_signature() -> str:
    """This CPU's model and flags: a GGML_NATIVE build is only good on a CPU that matches."""
    model, flags = "", ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not model:
                model = line.partition(":")[2].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.partition(":")[2].split()))
    return f"{model}; {flags}"


def version_of(root: Path) -> str:
    commit = vendored_commit(root) or "commit unknown"
    return f"{commit} (vendored by llama-cpp-python {SDIST_VERSION})"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One build per cache at a time: a second benchmark waits for the first one's build."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another build in {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cmake(root: Path, log: Path, started: float) -> str:
    """A cmake: the machine's, else one pip installs into the cache (the wheel ships the binary)."""
    found = shutil.which("cmake")
    if found:
        return found
    target = root / "cmake-pip"
    binary = target / "cmake" / "data" / "bin" / "cmake"
    if not binary.exists():
        _say(f"no cmake on PATH: installing it from PyPI into {target}")
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target)]
        _run([*pip, "cmake"], log, started, "installing cmake")
    return str(binary)


def ensure_llama_cpp(cache: Path = CACHE) -> LlamaCpp:
    """The built binaries, building them first where this cache has none (raises BuildError)."""
    root = cache / f"llama.cpp-{SDIST_VERSION}"
    bin_dir = root / "build" / "bin"
    stamp = root / "VERSION"  # written last: its presence means the build finished
    cpu_stamp = root / "CPU"  # the CPU it was built for (-march=native)

    def built() -> LlamaCpp | None:
        if not (stamp.exists() and all((bin_dir / t).exists() for t in TARGETS)):
            return None
        if not cpu_stamp.exists():  # built by an older script, on this machine
            cpu_stamp.write_text(cpu_signature() + "\n")
        if cpu_stamp.read_text().strip() != cpu_signature():
            _say("the cached build is for another CPU (a GGML_NATIVE build): building again")
            shutil.rmtree(root / "build", ignore_errors=True)
            stamp.unlink()
            return None
        version = version_of(root)
        if stamp.read_text().strip() != version:  # a stamp from an older script
            stamp.write_text(version + "\n")
        return LlamaCpp(bin_dir, version)

    if found := built():
        return found
    with _locked(root):
        if found := built():  # the build we waited for
            return found
        if shutil.which("c++") is None:
            raise BuildError("building llama.cpp needs a C++ compiler (c++ on PATH); none found")
        log = root / "build.log"
        started = time.monotonic()
        _say(f"building {', '.join(TARGETS)} once into {root} (log {log})")
        sdist = next(root.glob("llama_cpp_python-*.tar.gz"), None)
        if sdist is None:
            _say(f"downloading the llama-cpp-python {SDIST_VERSION} sdist (it vendors llama.cpp)")
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            spec = f"llama-cpp-python=={SDIST_VERSION}"
            _run([*pip, spec, "-d", str(root)], log, started, "downloading the sdist")
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
        _say(f"llama.cpp {version_of(root)}")
        # The sdist has no git history, so the binaries' own --version (and a running server's
        # /props) would say "unknown": give them the commit the changelog names.
        commit = vendored_commit(root)
        stamp_commit = [f"-DLLAMA_BUILD_COMMIT={commit}"] if commit else []
        cmake = _cmake(root, log, started)
        build = root / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _say("configuring (Release, GGML_NATIVE=ON, no CURL)")
        _run(
            [
                cmake, "-S", str(source), "-B", str(build), *generator,
                "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DBUILD_SHARED_LIBS=OFF",
                *stamp_commit,
            ],
            log, started, "configuring",
        )  # fmt: skip
        jobs = cores()
        _say(f"compiling with {jobs} jobs under nice {NICE} (many minutes on 2 cores)")
        build_command = [cmake, "--build", str(build), "--target", *TARGETS, "-j", str(jobs)]
        _run(build_command, log, started, "building", nice=NICE)
        cpu_stamp.write_text(cpu_signature() + "\n")
        stamp.write_text(version_of(root) + "\n")
        _say(f"built in {time.monotonic() - started:.0f} s: {bin_dir}")
    return LlamaCpp(bin_dir, version_of(root))


if __name__ == "__main__":
    try:
        peer = ensure_llama_cpp()
    except BuildError as exc:
        sys.exit(str(exc))
    print(f"llama-server: {peer.server}\nllama-bench: {peer.bench}\nllama.cpp: {peer.version}")
