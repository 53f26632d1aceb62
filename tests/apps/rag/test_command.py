"""`sorai index add|search|list|remove` end to end, with embeddings from a small
OpenAI-compatible /v1/embeddings endpoint on loopback (the test double embedder behind HTTP,
standing in for `sorai serve`'s real embedding model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sorai.apps.client import Client
from sorai.cli import main

from ..http_double import JSONHandler, closed_port, embeddings_body, serving
from .conftest import TrigramHashEmbedder, make_pdf


class _EmbeddingsHandler(JSONHandler):
    embedder = TrigramHashEmbedder("all-minilm-l6-v2")

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = self.read_json()
        if self.path != "/v1/embeddings":
            self.send_error(404)
            return
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.send_json(200, embeddings_body(body["model"], self.embedder.embed(texts)))


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with serving(_EmbeddingsHandler) as url:
        yield url


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "ja").mkdir(parents=True)
    (folder / "tea.md").write_text("# Tea\n\nGreen tea leaves are steamed soon after picking.")
    (folder / "ja" / "fuji.txt").write_text("富士山は日本で最も高い山です。標高は3776メートル。")
    (folder / "manual.pdf").write_bytes(make_pdf([["Intro page."], ["Bridges span rivers."]]))
    return folder


def test_add_search_list_remove(endpoint: str, docs: Path, tmp_path: Path, capsys):
    index = str(tmp_path / "cli.sqlite")
    assert main(["index", "add", str(docs), "--index", index, "--url", endpoint]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("3 added, 0 updated, 0 unchanged, 0 failed; 4 chunks written")
    assert "[3/3] added" in err
    assert "fuji.txt (1 chunk)\n" in err  # not "1 chunks"

    assert main(["index", "search", "how is green tea made", "--index", index, "--url",
                 endpoint, "-k", "2", "--json"]) == 0  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2
    assert Path(results[0]["path"]).name == "tea.md"
    assert results[0]["heading"] == "Tea"
    assert set(results[0]) >= {"chunk_id", "text", "page", "score", "vector_rank", "keyword_rank"}

    assert main(["index", "search", "bridges", "--index", index, "--url", endpoint]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("manual.pdf  p.2  (vector #1, keyword #1)")
    assert "Bridges span rivers." in out

    assert main(["index", "list", "--index", index, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(Path(d["path"]).name for d in listed) == ["fuji.txt", "manual.pdf", "tea.md"]

    assert main(["index", "remove", str(docs / "ja"), "--index", index]) == 0
    assert capsys.readouterr().out == "1 file removed; 3 chunks left\n"
    assert main(["index", "remove", str(docs / "ja"), "--index", index]) == 1


def test_keyword_search_needs_no_endpoint(endpoint: str, docs: Path, tmp_path: Path, capsys):
    index = str(tmp_path / "cli.sqlite")
    assert main(["index", "add", str(docs), "--index", index, "--url", endpoint]) == 0
    capsys.readouterr()
    nowhere = f"http://127.0.0.1:{closed_port()}"
    assert main(["index", "search", "標高", "--mode", "keyword", "--index", index,
                 "--url", nowhere]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "fuji.txt" in out and "(vector #-, keyword #1)" in out


def test_a_bad_file_fails_the_run_but_not_the_others(endpoint, docs, tmp_path, capsys):
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf")
    index = str(tmp_path / "cli.sqlite")
    assert main(["index", "add", str(docs), "--index", index, "--url", endpoint]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("3 added, 0 updated, 0 unchanged, 1 failed")
    assert f"failed: {docs / 'broken.pdf'}: unreadable PDF" in err


def test_errors_are_one_line(docs: Path, tmp_path: Path, capsys):
    missing = str(tmp_path / "missing.sqlite")
    assert main(["index", "search", "tea", "--index", missing, "--mode", "keyword"]) == 2
    assert capsys.readouterr().err.startswith("sorai: error: no index at")
    nowhere = f"http://127.0.0.1:{closed_port()}"
    index = str(tmp_path / "cli.sqlite")
    assert main(["index", "add", str(docs), "--index", index, "--url", nowhere]) == 2
    assert "sorai: error: cannot reach" in capsys.readouterr().err
    assert main(["index", "add", str(tmp_path / "nope"), "--index", index]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["index"]) == 2


def test_bad_add_arguments_fail_before_connecting_or_creating(tmp_path: Path, capsys, monkeypatch):
    """A missing path or bad sizes are reported at once: no server started (seconds, for a
    typo), no index file left behind."""

    def no_connect(*args, **kwargs):
        raise AssertionError("connected before checking the arguments")

    monkeypatch.setattr(Client, "find", no_connect)
    index = tmp_path / "new.sqlite"
    assert main(["index", "add", str(tmp_path / "nope"), "--index", str(index)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("text")
    assert (
        main(["index", "add", str(tmp_path / "a.txt"), "--index", str(index), "--overlap", "900"])
        == 2
    )
    assert "overlap must be in" in capsys.readouterr().err
    assert not index.exists()


def test_re_adding_unchanged_files_starts_no_server(endpoint, docs, tmp_path, capsys, monkeypatch):
    index = str(tmp_path / "cli.sqlite")
    assert main(["index", "add", str(docs), "--index", index, "--url", endpoint]) == 0

    def no_connect(*args, **kwargs):
        raise AssertionError("started a server with nothing to embed")

    monkeypatch.setattr(Client, "find", no_connect)
    capsys.readouterr()
    assert main(["index", "add", str(docs), "--index", index]) == 0
    assert "0 added, 0 updated, 3 unchanged" in capsys.readouterr().out
