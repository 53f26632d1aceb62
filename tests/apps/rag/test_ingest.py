"""Reading files into the index: each type, bad files reported and left out whole, re-adding,
removing, and the embedding model the index was built with."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from sorai.apps.rag import store
from sorai.apps.rag.chunk import Chunk
from sorai.apps.rag.ingest import add_files, find_files, read_document
from sorai.apps.rag.store import Index
from sorai.errors import DocumentError, SearchIndexError, SoraiError

from .conftest import TrigramHashEmbedder, make_pdf


def _count(index: Index, table: str) -> int:
    return sqlite3.connect(index.path).execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _fts_hits(index: Index, text: str) -> int:
    db = sqlite3.connect(index.path)
    query = "SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?"
    return db.execute(query, (f'"{text}"',)).fetchone()[0]


# -- reading each type ------------------------------------------------------------------------


def test_text_with_a_utf8_bom_reads_without_it(tmp_path: Path):
    path = tmp_path / "note.txt"
    path.write_bytes("\ufeff富士山は日本一高い山です。\r\nSecond line.".encode())
    document = read_document(path)
    assert document.text == "富士山は日本一高い山です。\nSecond line."


def test_text_that_is_not_utf8_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "sjis.txt"
    path.write_bytes("日本語のテキスト".encode("shift_jis"))
    with pytest.raises(DocumentError, match=r"not UTF-8 text \(byte 0x93 at offset 0\)"):
        read_document(path)


def test_markdown_headings_become_section_titles(tmp_path: Path):
    path = tmp_path / "guide.md"
    path.write_text(
        "# Guide\n\nIntro.\n\n## Install\n\nRun it.\n\n```sh\n# a comment, not a heading\n```\n"
        "\n### On Linux\n\nUse apt.\n\n## Use\n\nAsk away.\n"
    )
    document = read_document(path)
    assert document.title == "Guide"
    assert [s.heading for s in document.sections] == [
        "Guide",
        "Guide > Install",
        "Guide > Install > On Linux",
        "Guide > Use",
    ]
    install = document.sections[1]
    assert "# a comment, not a heading" in document.text[install.start : install.end]


def test_html_keeps_title_and_headings_and_drops_script_and_style(tmp_path: Path):
    path = tmp_path / "page.html"
    path.write_text(
        "<html><head><title>Fuji  FAQ</title><style>p { color: red }</style>"
        "<script>var secret = 'hidden';</script></head><body>"
        "<p>Welcome &amp; hello.</p><h2>Height</h2><p>It is <b>3,776</b> m.<br>Tall.</p>"
        "<noscript>enable js</noscript></body></html>"
    )
    document = read_document(path)
    assert document.title == "Fuji FAQ"
    assert "secret" not in document.text and "color" not in document.text
    assert "enable js" not in document.text
    assert [(document.text[s.start : s.end], s.heading) for s in document.sections] == [
        ("Welcome & hello.", "Fuji FAQ"),
        ("Height\n\nIt is 3,776 m.\nTall.", "Height"),
    ]


def test_markdown_front_matter_is_metadata_and_setext_headings_are_headings(tmp_path: Path):
    path = tmp_path / "post.md"
    path.write_text(
        '---\ntitle: "Front Title"\ntags: [a, b]\n---\n\nIntro.\n\nMain Part\n=========\n\n'
        "Body.\n\nDetails\nin two lines\n---\n\nMore.\n\n```\nCode\n---\n```\n"
    )
    document = read_document(path)
    assert document.title == "Front Title"
    spans = [(document.text[s.start : s.end].strip(), s.heading) for s in document.sections]
    assert spans == [
        ("Intro.", None),
        ("Main Part\n=========\n\nBody.", "Main Part"),
        (
            "Details\nin two lines\n---\n\nMore.\n\n```\nCode\n---\n```",
            "Main Part > Details in two lines",
        ),
    ]
    assert "tags" not in "".join(document.text[s.start : s.end] for s in document.sections)


def test_markdown_title_is_the_first_level_one_heading(tmp_path: Path):
    path = tmp_path / "two.md"
    path.write_text("# First\n\nA.\n\n# Second\n\nB.\n")
    assert read_document(path).title == "First"


@pytest.mark.parametrize(
    ("head", "encoding"),
    [
        ('<meta charset="shift_jis">', "cp932"),
        ("<meta http-equiv='Content-Type' content='text/html; charset=EUC-JP'>", "euc_jp"),
        ('<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">', "cp1252"),
    ],
)
def test_html_is_decoded_by_the_charset_it_declares(tmp_path: Path, head: str, encoding: str):
    path = tmp_path / "page.html"
    body = "東京の天気は晴れ。" if encoding != "cp1252" else "Café crème – 5 €."
    path.write_bytes(f"<html><head>{head}</head><body><p>{body}</p></body></html>".encode(encoding))
    assert read_document(path).text == body


def test_html_that_is_not_utf8_and_declares_nothing_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "page.html"
    path.write_bytes("<p>東京</p>".encode("shift_jis"))
    with pytest.raises(DocumentError, match="not UTF-8 text"):
        read_document(path)
    path.write_bytes(b'<meta charset="no-such-charset"><p>x</p>')
    with pytest.raises(DocumentError, match="unknown charset 'no-such-charset'"):
        read_document(path)


def test_html_table_rows_stay_on_one_line(tmp_path: Path):
    path = tmp_path / "prices.html"
    path.write_text(
        "<p>Prices:</p><table><tr><th>Item</th><th>Price</th></tr>"
        "<tr><td>Tea</td><td>3</td></tr></table>"
    )
    assert read_document(path).text == "Prices:\n\nItem | Price\nTea | 3"


def test_a_pdf_without_a_text_layer_is_reported_as_such(index: Index, embedder, tmp_path: Path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf([[], []]))
    report = add_files(index, [path], embedder)
    assert report.failed == 1 and "no text layer in its 2 page(s)" in report.failures[0][1]
    assert _count(index, "documents") == 0


def test_pdf_text_is_read_per_page(tmp_path: Path):
    path = tmp_path / "manual.pdf"
    path.write_bytes(make_pdf([["Chapter one.", "Bridges span rivers."], ["Chapter two."]]))
    document = read_document(path)
    pages = [(document.text[s.start : s.end], s.page) for s in document.sections]
    assert pages == [("Chapter one.\nBridges span rivers.", 1), ("Chapter two.", 2)]


def test_pdf_chunks_record_their_page(index: Index, embedder: TrigramHashEmbedder, tmp_path):
    path = tmp_path / "manual.pdf"
    path.write_bytes(make_pdf([["Alpha page text."], ["Beta page text."], ["Gamma page."]]))
    add_files(index, [path], embedder)
    rows = sqlite3.connect(index.path).execute("SELECT text, page FROM chunks ORDER BY ord")
    assert rows.fetchall() == [("Alpha page text.", 1), ("Beta page text.", 2), ("Gamma page.", 3)]


def test_directories_are_walked_for_supported_files(tmp_path: Path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for name in ["a.md", "sub/b.TXT", "sub/deeper/c.html", "sub/skip.py", ".git/d.md"]:
        (tmp_path / name).write_text("text")
    found = [p.relative_to(tmp_path).as_posix() for p in find_files([tmp_path])]
    assert found == ["a.md", "sub/b.TXT", "sub/deeper/c.html"]
    with pytest.raises(SoraiError, match="no such file or directory: nowhere"):
        find_files(["nowhere"])


# -- bad files --------------------------------------------------------------------------------


def test_a_corrupt_pdf_is_reported_and_nothing_of_it_is_indexed(
    index: Index, embedder: TrigramHashEmbedder, tmp_path: Path
):
    good = tmp_path / "good.md"
    good.write_text("Lighthouses guide ships at night.")
    broken = tmp_path / "broken.pdf"
    pdf = make_pdf([["Page one survives."], ["Page two."]])
    broken.write_bytes(pdf[: len(pdf) // 2])  # truncated mid-file
    report = add_files(index, [tmp_path], embedder)
    assert (report.added, report.failed) == (1, 1)
    assert report.failures[0][0] == str(broken)
    assert report.failures[0][1].startswith("unreadable PDF")
    assert [d.path for d in index.documents()] == [str(good)]
    assert _count(index, "chunks") == _count(index, "vectors") == 1
    assert _fts_hits(index, "survives") == 0


def test_a_file_with_no_text_is_reported(index: Index, embedder, tmp_path: Path):
    (tmp_path / "empty.md").write_text("  \n\n ")
    report = add_files(index, [tmp_path], embedder)
    assert report.failures == [(str(tmp_path / "empty.md"), "no text to index")]


def test_a_write_that_fails_midway_leaves_the_previous_version(index: Index, embedder, tmp_path):
    path = tmp_path / "doc.md"
    path.write_text("Original text about lighthouses.")
    add_files(index, [path], embedder)
    before = (_count(index, "chunks"), _count(index, "vectors"), index.document(str(path)))
    chunks = [Chunk(0, "new first chunk", 0, 15, None, None), Chunk(1, None, 16, 30, None, None)]
    with pytest.raises(sqlite3.IntegrityError):  # the second chunk breaks NOT NULL
        index.put_document(
            str(path),
            sha256="other",
            mtime=0.0,
            chunks=chunks,
            vectors=embedder.embed(["a", "b"]),
            embedding_model=embedder.embedding_model,
        )
    assert (_count(index, "chunks"), _count(index, "vectors"), index.document(str(path))) == before
    assert _fts_hits(index, "lighthouses") == 1 and _fts_hits(index, "new first") == 0


# -- updating and removing --------------------------------------------------------------------


def test_unchanged_files_are_skipped_without_embedding(index: Index, embedder, tmp_path: Path):
    (tmp_path / "a.md").write_text("Alpha text.")
    add_files(index, [tmp_path], embedder)
    embedded = embedder.texts_embedded
    report = add_files(index, [tmp_path], embedder)
    assert (report.added, report.updated, report.skipped) == (0, 0, 1)
    assert embedder.texts_embedded == embedded


def test_a_changed_file_replaces_its_chunks(index: Index, embedder, tmp_path: Path):
    path = tmp_path / "a.md"
    path.write_text("Old words about bicycles.\n\n" + "Filler sentence here. " * 60)
    add_files(index, [path], embedder, chunk_size=400, overlap=40)
    assert index.document(str(path)).n_chunks > 1
    path.write_text("New words about sailboats.")
    report = add_files(index, [path], embedder, chunk_size=400, overlap=40)
    assert (report.added, report.updated) == (0, 1)
    assert index.document(str(path)).n_chunks == 1
    assert _count(index, "chunks") == _count(index, "vectors") == 1
    assert _fts_hits(index, "bicycles") == 0 and _fts_hits(index, "sailboats") == 1


def test_other_chunk_sizes_reindex_an_unchanged_file(index: Index, embedder, tmp_path: Path):
    path = tmp_path / "a.md"
    path.write_text("Sentence number one is here. " * 40)
    add_files(index, [path], embedder, chunk_size=800, overlap=100)
    report = add_files(index, [path], embedder, chunk_size=200, overlap=20)
    assert report.updated == 1
    assert index.document(str(path)).chunk_size == 200


def test_remove_a_file_and_a_directory(index: Index, embedder, tmp_path: Path):
    (tmp_path / "keep.md").write_text("Keep me.")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.md").write_text("Old a.")
    (tmp_path / "old" / "b.txt").write_text("Old b.")
    (tmp_path / "older.md").write_text("Not under old/ despite the name.")
    add_files(index, [tmp_path], embedder)
    assert index.remove(tmp_path / "old") == [
        str(tmp_path / "old/a.md"),
        str(tmp_path / "old/b.txt"),
    ]
    assert index.remove(tmp_path / "keep.md") == [str(tmp_path / "keep.md")]
    assert index.remove(tmp_path / "missing.md") == []
    assert [d.path for d in index.documents()] == [str(tmp_path / "older.md")]
    assert _count(index, "chunks") == _count(index, "vectors") == 1
    assert _fts_hits(index, "Keep me") == 0


# -- the embedding model ----------------------------------------------------------------------


def test_the_index_records_the_embedding_model_and_refuses_another(index: Index, tmp_path):
    (tmp_path / "a.md").write_text("Alpha.")
    add_files(index, [tmp_path], TrigramHashEmbedder("model-a"))
    assert (index.embedding_model, index.dimension) == ("model-a", 384)
    (tmp_path / "b.md").write_text("Beta.")
    with pytest.raises(SearchIndexError, match="embedding model 'model-a', not 'model-b'"):
        add_files(index, [tmp_path], TrigramHashEmbedder("model-b"))
    assert index.document(str(tmp_path / "b.md")) is None


def test_an_emptied_index_takes_a_new_embedding_model(index: Index, tmp_path: Path):
    (tmp_path / "a.md").write_text("Alpha.")
    add_files(index, [tmp_path], TrigramHashEmbedder("model-a"))
    index.remove(tmp_path)
    add_files(index, [tmp_path], TrigramHashEmbedder("model-b", dimension=64))
    assert (index.embedding_model, index.dimension) == ("model-b", 64)


def test_a_file_that_is_not_an_index_is_refused(tmp_path: Path):
    other = tmp_path / "app.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(SearchIndexError, match="not a sorai index"):
        Index(other)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(SearchIndexError, match="not a sorai index"):
        Index(garbage)
    with pytest.raises(SearchIndexError, match="no index at"):
        Index(tmp_path / "absent.sqlite", create=False)


def test_two_processes_creating_one_new_index_both_open_it(tmp_path: Path):
    """Two `sorai index add` at once on a new index: while one holds the write lock creating
    the schema, the other (which saw an empty file) waits for it and opens the index, rather
    than failing on 'table meta already exists'."""
    path = tmp_path / "new.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.executescript(  # the other process, mid-creation: its transaction not committed
        f"BEGIN IMMEDIATE; {store._SCHEMA}; "
        f"INSERT INTO meta VALUES ('schema_version', '{store.SCHEMA_VERSION}');"
    )
    # It commits once this one is waiting for the lock (SQLite's busy timeout is 5 s).
    threading.Timer(0.2, other.commit).start()
    with Index(path) as index:
        assert index.chunk_count() == 0 and index.documents() == []
    other.close()


def test_remove_a_symbolic_link_found_in_a_directory(index: Index, embedder, tmp_path: Path):
    """A link inside an added directory is indexed at the link's path; removing that path
    removes it (resolving it first pointed at the target, which is not indexed)."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "real.md").write_text("Linked text.")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "link.md").symlink_to(tmp_path / "elsewhere" / "real.md")
    add_files(index, [tmp_path / "docs"], embedder)
    assert [d.path for d in index.documents()] == [str(tmp_path / "docs" / "link.md")]
    assert index.remove(tmp_path / "docs" / "link.md") == [str(tmp_path / "docs" / "link.md")]
    assert index.documents() == []


def test_an_index_of_another_schema_version_is_refused_clearly(index: Index, tmp_path: Path):
    newer = sqlite3.connect(index.path)
    newer.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    newer.commit()
    newer.close()
    with pytest.raises(SearchIndexError, match="schema version 2; this sorai reads version 1"):
        Index(index.path)


def test_a_symbolic_link_loop_is_reported_not_raised(index: Index, embedder, tmp_path: Path):
    loop = tmp_path / "loop.md"
    loop.symlink_to(loop)
    (tmp_path / "fine.md").write_text("Fine text.")
    report = add_files(index, [loop, tmp_path], embedder)
    assert report.added == 1
    assert [(path, "symbolic links" in why) for path, why in report.failures] == [(str(loop), True)]
    assert index.remove(loop) == []
