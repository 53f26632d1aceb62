"""A Hugging Face Hub double on loopback: the few endpoints huggingface_hub calls to pull a
repository (model info at a revision, HEAD and ranged GET of `resolve/REV/FILE` with the Hub's
ETag, X-Repo-Commit and X-Linked-* headers, its X-Error-Code 404s), serving repositories held
in memory, with faults a test can script per file (a connection dropped mid-file, a 503, bytes
that do not match their checksum). These machines reach no hub, so pulls are tested here."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    branches: dict[str, str] = field(default_factory=lambda: {"main": ""})

    def __post_init__(self) -> None:
        self.branches = {b: c or self.commit for b, c in self.branches.items()}

    def commit_of(self, revision: str | None) -> str | None:
        if revision is None:
            return self.branches["main"]
        if revision in self.branches:
            return self.branches[revision]
        commits = {self.commit, *self.branches.values()}
        return next((c for c in commits if c.startswith(revision) and len(revision) >= 7), None)


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def etag(name: str, data: bytes) -> str:
    """The Hub's ETag: an LFS file's sha256, else its git blob id."""
    if is_lfs(name):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FakeHub:
    """Repositories by id, served at `url`; `faults[file]` is a list of what the next GETs of
    that file meet: "drop" (the connection closes halfway), "503", "corrupt" (one byte wrong)."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.faults: dict[str, list[str]] = {}
        self.seen: list[Seen] = []
        # As the Hub does: LFS files answer with a redirect to a CDN host (here "localhost"
        # rather than "127.0.0.1": another host to the client), whose URL carries no token.
        self.cdn = False
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def gets(self, name: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path.endswith("/" + name)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _error(self, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.seen.append(
            Seen(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
        )
        if match := _INFO.match(path):
            return self._info(match["repo"], match["rev"])
        if match := _RESOLVE.match(path):
            return self._resolve(match["repo"], match["rev"], match["file"])
        if match := _CDN.match(path):
            return self._resolve(match["repo"], match["rev"], match["file"], cdn=True)
        self._error(404, "RepoNotFound")

    def _info(self, repo_id: str, revision: str | None) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound")
        commit = repo.commit_of(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound")
        siblings = []
        for name, data in sorted(repo.files.items()):
            sibling = {"rfilename": name, "size": len(data), "blobId": etag(name, data)}
            if is_lfs(name):
                sha = hashlib.sha256(data).hexdigest()
                sibling["blobId"] = hashlib.sha1(sha.encode()).hexdigest()  # the pointer's id
                sibling["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 132}
            siblings.append(sibling)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit,
                           "siblings": siblings, "private": False}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self, repo_id: str, revision: str, name: str, cdn: bool = False) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound")
        commit = repo.commit_of(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound")
        if name not in repo.files:
            return self._error(404, "EntryNotFound")
        data = repo.files[name]
        if self.hub.cdn and is_lfs(name) and not cdn:
            port = self.server.server_address[1]
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/cdn/{repo_id}/{commit}/{name}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{etag(name, data)}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        fault = None
        if self.command == "GET" and self.hub.faults.get(name):
            fault = self.hub.faults[name].pop(0)
        if fault == "503":
            return self._error(503, "Unavailable")
        if fault == "corrupt":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        tag = etag(name, repo.files[name])
        start = 0
        if self.command == "GET" and (ranged := self.headers.get("Range")):
            start = int(re.match(r"bytes=(\d+)-", ranged)[1])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{tag}"')
        if is_lfs(name):
            self.send_header("X-Linked-Etag", f'"{tag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "drop":
            # Half the body, then the connection goes: the client sees a short read.
            self.wfile.write(data[start : start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data[start:])


def tiny_checkpoint_files(default_gguf: Path, directory: Path) -> dict[str, bytes]:
    """A repository's files: a tiny random Llama (2 layers, hidden 64) with the default model's
    tokenizer, plus what real repositories also hold and a pull leaves on the Hub."""
    from sorai.model.scratch import write_random_model

    checkpoint = write_random_model(
        default_gguf,
        directory,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    files["README.md"] = b"# tiny\n"
    files["pytorch_model.bin"] = b"not fetched"
    return files
