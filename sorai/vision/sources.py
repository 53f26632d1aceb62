"""Where an image part's `url` may point, and reading its bytes under the operator's rules.

- `data:image/...;base64,...`: always accepted.
- A local path (`file:///...` or a plain path): only inside one of `allowed_dirs` (after
  symlinks are resolved); none by default.
- `http://` and `https://`: only when `allow_fetch` is set (off by default), at most
  `limits.max_bytes`, within `fetch_timeout` seconds.
Anything else is refused. Every refusal is an ImageError that says what would be accepted.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sorai.errors import ImageError
from sorai.vision.decode import ImageLimits

MAX_IMAGES = 8  # image parts in one request
FETCH_TIMEOUT_S = 10.0
_DATA_URL = re.compile(
    r"^data:(?P<type>[\w.+/-]*)(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,"
)


@dataclass(frozen=True)
class MediaPolicy:
    """The operator's rules for image sources (`sorai serve --allowed-media-dir`,
    `--allow-image-fetch`) and the size limits every image meets."""

    allowed_dirs: tuple[Path, ...] = ()
    allow_fetch: bool = False
    fetch_timeout: float = FETCH_TIMEOUT_S
    max_images: int = MAX_IMAGES
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        dirs = tuple(Path(d).expanduser().resolve() for d in self.allowed_dirs)
        for d in dirs:
            if not d.is_dir():
                raise ImageError(f"allowed media directory {str(d)!r} is not a directory")
        object.__setattr__(self, "allowed_dirs", dirs)


def _short(url: str) -> str:
    return repr(url[:60] + "..." if len(url) > 60 else url)


def read_source(url: str, policy: MediaPolicy, name: str = "image") -> bytes:
    """The bytes `url` names, if `policy` allows reading them (see the module docstring)."""
    if url.startswith("data:"):
        return _data_url(url, policy, name)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_fetch:
            raise ImageError(
                f"{name}: fetching image URLs is off on this server ({_short(url)}); send the "
                "image as a data: URL (data:image/png;base64,...), or start the server with "
                "--allow-image-fetch"
            )
        return _fetch(url, policy, name)
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(
                f"{name}: file URLs name a local file (file:///path), got {_short(url)}"
            )
        return _local(urllib.parse.unquote(parts.path), policy, name)
    if scheme and len(scheme) > 1:  # "c:" is a drive, not a scheme
        raise ImageError(
            f"{name}: unsupported URL scheme {scheme!r} ({_short(url)}); use a data: URL, a "
            "path under an allowed media directory, or http(s) when fetching is on"
        )
    return _local(url, policy, name)


def _data_url(url: str, policy: MediaPolicy, name: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise ImageError(
            f"{name}: a data URL must be base64, as data:image/png;base64,<data>; got {_short(url)}"
        )
    kind = match.group("type").lower()
    if kind and not kind.startswith("image/"):
        raise ImageError(f"{name}: the data URL holds {kind!r}, not an image/* type")
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > policy.limits.max_bytes + 3:
        raise ImageError(
            f"{name}: the data URL holds about {len(payload) * 3 // 4} bytes; images may be at "
            f"most {policy.limits.max_bytes} bytes"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{name}: the data URL's base64 is malformed") from None


def _local(path: str, policy: MediaPolicy, name: str) -> bytes:
    if not policy.allowed_dirs:
        raise ImageError(
            f"{name}: local paths ({_short(path)}) are off on this server; send the image as a "
            "data: URL, or start the server with --allowed-media-dir DIR"
        )
    resolved = Path(os.path.expanduser(path)).resolve()
    if not any(resolved.is_relative_to(d) for d in policy.allowed_dirs):
        allowed = ", ".join(str(d) for d in policy.allowed_dirs)
        raise ImageError(
            f"{name}: {_short(path)} is outside the allowed media directories ({allowed})"
        )
    try:
        with open(resolved, "rb") as f:
            data = f.read(policy.limits.max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"{name}: cannot read {_short(path)} ({exc.strerror})") from None
    return data


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could lead from an allowed public URL to anything; the client can follow it.
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def _fetch(url: str, policy: MediaPolicy, name: str) -> bytes:
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers={"User-Agent": "sorai"})
    try:
        with opener.open(request, timeout=policy.fetch_timeout) as response:
            if response.status != 200:
                raise ImageError(f"{name}: {_short(url)} answered HTTP {response.status}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.limits.max_bytes:
                raise ImageError(
                    f"{name}: {_short(url)} is {declared} bytes; images may be at most "
                    f"{policy.limits.max_bytes} bytes"
                )
            return response.read(policy.limits.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise ImageError(f"{name}: {_short(url)} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"{name}: cannot fetch {_short(url)} ({reason})") from None
