"""Image sources under the operator's policy: data URLs, allowed directories, fetching."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sorai.errors import ImageError
from sorai.vision.decode import ImageLimits
from sorai.vision.sources import MediaPolicy, read_source

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100


def test_data_urls_are_read() -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert read_source(url, MediaPolicy()) == PNG


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("data:image/png,rawbytes", "must be base64"),
        ("data:text/html;base64,PGgxPg==", "not an image"),
        ("data:image/png;base64,@@@@", "malformed"),
        ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
    ],
)
def test_malformed_or_foreign_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        read_source(url, MediaPolicy())


def test_an_oversized_data_url_is_refused_before_decoding() -> None:
    url = "data:image/png;base64," + "A" * 4000
    with pytest.raises(ImageError, match="at most 1000 bytes"):
        read_source(url, MediaPolicy(limits=ImageLimits(max_bytes=1000)))


def test_local_paths_only_under_allowed_dirs(tmp_path: Path) -> None:
    allowed, other = tmp_path / "media", tmp_path / "private"
    allowed.mkdir()
    other.mkdir()
    (allowed / "a.png").write_bytes(PNG)
    (other / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(other / "secret.png")
    policy = MediaPolicy(allowed_dirs=(allowed,))
    assert read_source(str(allowed / "a.png"), policy) == PNG
    assert read_source((allowed / "a.png").as_uri(), policy) == PNG
    for escape in (other / "secret.png", allowed / ".." / "private" / "secret.png"):
        with pytest.raises(ImageError, match="outside the allowed media directories"):
            read_source(str(escape), policy)
    with pytest.raises(ImageError, match="outside the allowed"):  # a symlink out counts
        read_source(str(allowed / "link.png"), policy)
    with pytest.raises(ImageError, match="local paths .* are off.*--allowed-media-dir"):
        read_source(str(allowed / "a.png"), MediaPolicy())


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/a.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)
            elif self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:1/a.png")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_fetched_only_when_allowed(http_server: str) -> None:
    with pytest.raises(ImageError, match="fetching image URLs is off.*--allow-image-fetch"):
        read_source(http_server + "/a.png", MediaPolicy())
    fetching = MediaPolicy(allow_fetch=True, fetch_timeout=5)
    assert read_source(http_server + "/a.png", fetching) == PNG
    with pytest.raises(ImageError, match="HTTP 404"):
        read_source(http_server + "/missing.png", fetching)
    with pytest.raises(ImageError, match="HTTP 302"):  # redirects are not followed
        read_source(http_server + "/away", fetching)
    small = MediaPolicy(allow_fetch=True, limits=ImageLimits(max_bytes=50))
    with pytest.raises(ImageError, match="at most 50 bytes"):
        read_source(http_server + "/a.png", small)
