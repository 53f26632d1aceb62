"""`sorai pull hf:ORG/REPO[/FILE.gguf][@REV]`: a Hugging Face Hub repository into the cache.

Files download into a staging directory per commit (`.part` files resume where a dropped or
interrupted transfer stopped), each is checked against the Hub's checksum (an LFS file's sha256,
a small file's git blob id), and only a complete, checked set is moved into place and recorded
in the registry. HF_ENDPOINT (a mirror, or a local server in the tests) and HF_TOKEN are read
at each pull.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sorai import registry
from sorai.errors import HubError, ModelNotFoundError

PREFIX = "hf:"
DEFAULT_ENDPOINT = "https://huggingface.co"

# What a Transformers checkpoint needs to load; everything else in a repository (other weight
# formats, ONNX exports, READMEs, images) is left on the Hub.
CHECKPOINT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "model.safetensors.index.json",
    }
)
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})


@dataclass(frozen=True)
class HFSpec:
    """A parsed `hf:` model argument: the repository, an optional file in it, a revision."""

    repo: str  # "org/name" (or "name")
    file: str | None = None  # a .gguf (or other single file) in the repository
    revision: str | None = None  # branch, tag or commit; None: the default branch

    @property
    def name(self) -> str:
        """The registry name: what `ls` shows and what the model is asked for by later."""
        return f"{self.repo}/{self.file}" if self.file else self.repo

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{self.name}{at}"


def is_spec(text: str) -> bool:
    return text.startswith(PREFIX)


def parse(text: str, file: str | None = None) -> HFSpec:
    """`hf:ORG/REPO`, `hf:ORG/REPO@REV`, `hf:ORG/REPO/FILE.gguf[@REV]` (or `file` given apart)."""
    body = text.removeprefix(PREFIX).strip()
    path, _, revision = body.partition("@")
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts) or (revision == "" and "@" in body):
        raise ModelNotFoundError(
            f"{text!r} is not a Hub model: write hf:ORG/REPO, hf:ORG/REPO@REVISION or "
            "hf:ORG/REPO/FILE.gguf"
        )
    repo = "/".join(parts[:2])
    named = "/".join(parts[2:]) or None
    if named and file and named != file:
        raise ModelNotFoundError(f"{text!r} names the file {named!r} and --file {file!r}: give one")
    return HFSpec(repo=repo, file=named or file, revision=revision or None)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _token() -> str | None:
    # Read now, not when huggingface_hub was imported, so a token set later is honoured; None
    # lets huggingface_hub fall back to a stored `hf auth login` token.
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: what the Hub reports as a non-LFS file's ETag."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Remote:
    """One file to fetch, with the checksum it must match."""

    name: str
    size: int | None
    algorithm: str  # "sha256" (LFS) or "git-sha1"
    digest: str

    @property
    def checksum(self) -> str:
        return f"{self.algorithm}:{self.digest}"

    def actual(self, path: Path) -> str:
        return _sha256(path) if self.algorithm == "sha256" else git_blob_sha1(path)


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(__import__(module).TransportError)
    return tuple(errors)


def _hub_error(spec: HFSpec, exc: BaseException, file: str | None = None) -> HubError:
    """One line naming what was not found where, from huggingface_hub's exception."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RevisionNotFoundError

    where = endpoint()
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{spec}: the repository {spec.repo} is gated; accept its terms and set HF_TOKEN"
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{spec}: {spec.repo} has no revision {spec.revision!r} at {where}")
    if isinstance(exc, HfHubHTTPError):
        response = exc.response
        code = response.headers.get("X-Error-Code") if response is not None else None
        status = response.status_code if response is not None else None
        if code == "EntryNotFound" and file:
            return HubError(f"{spec}: {spec.repo} has no file {file!r}")
        if code == "RepoNotFound" or status in (401, 404):
            return HubError(
                f"{spec}: no repository {spec.repo!r} at {where} (a private one needs HF_TOKEN)"
            )
        return HubError(
            f"{spec}: the Hub at {where} answered HTTP {status} for {file or 'the repository'}"
        )
    return HubError(f"{spec}: cannot reach the Hub at {where}: {exc}")


def _quiet() -> bool:
    """No progress bars where nobody watches: not a terminal, or a CI job."""
    return not sys.stderr.isatty() or bool(os.environ.get("CI"))


def _progress_class() -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Bar(hf_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            if _quiet():
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Bar


def _choose(spec: HFSpec, siblings: list) -> tuple[str, str, list]:
    """(kind, format, files) to fetch from the repository's file list."""
    names = {s.rfilename: s for s in siblings}
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if spec.file is not None:
        if spec.file not in names:
            held = f"its .gguf files: {', '.join(ggufs)}" if ggufs else "it holds no .gguf file"
            raise HubError(f"{spec}: {spec.repo} has no file {spec.file!r} ({held})")
        if not spec.file.endswith(".gguf"):
            raise HubError(f"{spec}: name a .gguf file; {spec.file!r} is not one")
        return registry.MODEL, "gguf", [names[spec.file]]
    top = {n: s for n, s in names.items() if "/" not in n}
    if "config.json" not in top and set(top) >= ADAPTER_FILES:
        return registry.ADAPTER, "peft", [top[n] for n in sorted(ADAPTER_FILES)]
    weights = sorted(n for n in top if n.endswith(".safetensors"))
    hint = f"; for a GGUF file name it: {PREFIX}{spec.repo}/{ggufs[0]}" if ggufs else ""
    if "config.json" not in top:
        raise HubError(
            f"{spec}: {spec.repo} has no config.json, so it is no Transformers checkpoint{hint}"
        )
    if not weights:
        raise HubError(
            f"{spec}: {spec.repo} has no .safetensors weights (sorai reads "
            f"safetensors or GGUF){hint}"
        )
    wanted = sorted(n for n in top if n in CHECKPOINT_FILES) + weights
    return registry.MODEL, "safetensors", [top[n] for n in wanted]


def _remote(spec: HFSpec, sibling, head) -> _Remote:
    """The checksum a file must match: the LFS sha256 from the file list, else the ETag the
    resolve endpoint sent (an LFS file's sha256, a small file's git blob id)."""
    lfs = getattr(sibling, "lfs", None)
    size = head.size if head.size is not None else sibling.size
    if lfs is not None and getattr(lfs, "sha256", None):
        if head.etag and len(head.etag) == 64 and head.etag != lfs.sha256:
            raise HubError(
                f"{spec}: {sibling.rfilename}: the file list says sha256 {lfs.sha256} but the "
                f"file's ETag is {head.etag}"
            )
        return _Remote(sibling.rfilename, lfs.size or size, "sha256", lfs.sha256)
    etag = head.etag or sibling.blob_id or ""
    if len(etag) == 64:
        return _Remote(sibling.rfilename, size, "sha256", etag)
    if len(etag) == 40:
        return _Remote(sibling.rfilename, size, "git-sha1", etag)
    raise HubError(f"{spec}: the Hub gave no checksum for {sibling.rfilename} (ETag {etag!r})")


@contextlib.contextmanager
def _staging_lock(path: Path) -> Iterator[None]:
    """One pull of a commit at a time: a second waits, then finds the files there."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Transfers that fail without moving a byte forward are retried this often before the pull
# gives up (the .part stays for the next pull either way).
_RETRIES = 3


def _fetch(spec: HFSpec, remote: _Remote, url: str, dest: Path, headers: dict, bar: type) -> None:
    """Download one file to `dest`, continuing its `.part` with a ranged GET, then check it."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if remote.size is not None and have > remote.size:
        part.unlink()  # longer than the file: not a prefix of it
        have = 0
    failures = 0
    with bar(total=remote.size, initial=have, unit="B", unit_scale=True, desc=remote.name) as shown:
        while remote.size is None or have < remote.size:
            try:
                gained = _transfer(url, part, have, headers, shown)
            except _network_errors() as e:
                gained = part.stat().st_size - have if part.exists() else 0
                failures = 0 if gained else failures + 1
                if failures >= _RETRIES or not _transient(e):
                    # The .part stays: the next pull continues from its last byte.
                    raise _hub_error(spec, e, remote.name) from None
                have += gained
                continue
            have = part.stat().st_size
            if remote.size is None or not gained:
                break
    got = remote.actual(part)
    if got != remote.digest:
        part.unlink()  # a wrong byte somewhere: resuming from it would keep it
        raise HubError(
            f"{spec}: checksum mismatch for {remote.name}: expected {remote.algorithm} "
            f"{remote.digest}, got {got}; nothing was registered, pull again"
        )
    os.replace(part, dest)


def _transient(exc: BaseException) -> bool:
    """A dropped connection or a timeout is worth a retry; an HTTP error answer is not."""
    from huggingface_hub.errors import HfHubHTTPError

    return not isinstance(exc, HfHubHTTPError)


def _transfer(url: str, part: Path, have: int, headers: dict, shown) -> int:
    """One GET from byte `have` on, appended to `part` as it arrives; returns the bytes added."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    request = {**headers, "Accept-Encoding": "identity"}
    if have:
        request["Range"] = f"bytes={have}-"
    with get_session().stream(
        "GET",
        url,
        headers=request,
        follow_redirects=True,
        timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
    ) as response:
        hf_raise_for_status(response)
        mode = "ab"
        if have and response.status_code == 200:
            # The server ignored the range and sends the whole file: start it over.
            mode, have = "wb", 0
            shown.reset(total=shown.total)
        added = 0
        with open(part, mode) as f:
            # Written as it arrives (no fixed-size chunks): a dropped connection loses nothing
            # that reached this machine.
            for chunk in response.iter_bytes():
                f.write(chunk)
                added += len(chunk)
                shown.update(len(chunk))
        return added


def pull(
    spec: HFSpec,
    home: Path,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> registry.Entry:
    """Fetch `spec` into `home`'s model cache (unless that commit is there) and register it."""
    from huggingface_hub import HfApi
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    say = progress or (lambda message: None)
    where, token = endpoint(), _token()
    api = HfApi(endpoint=where, token=token)
    try:
        info = api.model_info(spec.repo, revision=spec.revision, files_metadata=True)
    except _network_errors() as e:
        raise _hub_error(spec, e) from None
    commit = info.sha
    if not commit:
        raise HubError(f"{spec}: the Hub at {where} did not say which commit it serves")
    kind, fmt, siblings = _choose(spec, info.siblings or [])
    existing = registry.get(home, spec.name)
    up_to_date = (
        existing is not None
        and (existing.revision, existing.ref) == (commit, spec.revision)
        and Path(existing.path).exists()
    )
    if up_to_date and not force:
        say(f"{spec.name} is up to date (commit {commit[:12]})")
        return existing
    key = spec.name.replace("/", "--")
    final = home / "models" / "hf" / key / commit
    staging = home / "models" / ".partial" / f"{key}@{commit}"
    headers = build_hf_headers(token=token)
    total = sum(s.size or 0 for s in siblings)
    say(f"pulling {spec} (commit {commit[:12]}): {len(siblings)} files, {total / 1e6:.1f} MB")
    files: dict[str, str] = {}
    bar = _progress_class()
    # An adapter sits in a directory named after its repository: that name is what it is
    # served as (BASE+NAME), not the commit's.
    inner = spec.repo.split("/")[-1] if kind == registry.ADAPTER else ""
    with _staging_lock(staging):
        again = registry.get(home, spec.name)
        if not force and again is not None and again != existing and again.revision == commit:
            return again  # another pull of the same commit finished while this one waited
        for sibling in siblings:
            url = hf_hub_url(spec.repo, sibling.rfilename, revision=commit, endpoint=where)
            try:
                head = get_hf_file_metadata(url, token=token, endpoint=where)
            except _network_errors() as e:
                raise _hub_error(spec, e, sibling.rfilename) from None
            if head.commit_hash and head.commit_hash != commit:
                raise HubError(
                    f"{spec}: {sibling.rfilename} came from commit {head.commit_hash}, "
                    f"not {commit}; pull again"
                )
            remote = _remote(spec, sibling, head)
            dest = staging / inner / sibling.rfilename
            location = head.location or url
            if not dest.exists() or force:
                _fetch(spec, remote, location, dest, _for_host(headers, url, location), bar)
            files[remote.name] = remote.checksum
        (staging / ".lock").unlink()
        base = _adapter_base(staging / inner) if kind == registry.ADAPTER else None
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        # One rename: the model appears under its final path whole, or not at all.
        os.replace(staging, final)
    path = final / (spec.file or inner) if spec.file or inner else final
    entry = registry.Entry(
        name=spec.name,
        kind=kind,
        format=fmt,
        path=str(path),
        source=f"{PREFIX}{spec.repo}@{commit}",
        size=registry.disk_size(final),
        base=base,
        revision=commit,
        ref=spec.revision,
        files=files,
    )
    previous = registry.put(home, entry)
    if previous is not None and previous.owned and previous.path != entry.path:
        remove_files(home, previous)
    say(f"{spec.name} ready at {path}")
    return entry


def _for_host(headers: dict, url: str, location: str) -> dict:
    """The token goes to the Hub only: an LFS file redirected to a CDN host (its URL signed)
    is fetched without it."""
    if urlsplit(location).netloc == urlsplit(url).netloc:
        return headers
    return {k: v for k, v in headers.items() if k.lower() != "authorization"}


def _adapter_base(path: Path) -> str | None:
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("base_model_name_or_path") or None


def remove_files(home: Path, entry: registry.Entry) -> int:
    """Delete a pulled entry's commit directory (and its repository's, once empty); returns
    the bytes freed. Files outside the cache are never touched."""
    root = home / "models" / "hf"
    revision = entry.revision or ""
    commit_dir = next((p for p in Path(entry.path).parents if p.name == revision), None)
    if commit_dir is None and Path(entry.path).name == revision:
        commit_dir = Path(entry.path)
    if commit_dir is None or root not in commit_dir.parents or not commit_dir.exists():
        return 0
    freed = registry.disk_size(commit_dir)
    shutil.rmtree(commit_dir)
    with contextlib.suppress(OSError):
        commit_dir.parent.rmdir()  # only when no other commit is left in it
    return freed
