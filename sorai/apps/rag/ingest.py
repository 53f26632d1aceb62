"""Files into the index: read .txt / .md / .html / .pdf into text with sections, chunk, embed,
and write each file in one transaction (a file that fails leaves nothing behind)."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from sorai.apps.rag.chunk import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_OVERLAP,
    Chunk,
    Section,
    check_sizes,
    chunk_text,
)
from sorai.apps.rag.embed import embed_texts, embedding_window
from sorai.apps.rag.store import Embedder, Index, resolve_path
from sorai.apps.text import plural
from sorai.errors import DocumentError, SoraiError

EMBED_BATCH = 256  # chunks per embedding call; several small files share one call


@dataclass(frozen=True)
class Document:
    """A file's text as indexed: `sections` are spans of `text` under one heading / page."""

    path: Path
    text: str
    sections: list[Section]
    title: str | None = None


def _join(parts: list[tuple[str, str | None, int | None]]) -> tuple[str, list[Section]]:
    """(text, heading, page) parts -> one text, blank-line separated, and its sections."""
    pieces, sections, offset = [], [], 0
    for text, heading, page in parts:
        if not text.strip():
            continue
        if pieces:
            pieces.append("\n\n")
            offset += 2
        pieces.append(text)
        sections.append(Section(offset, offset + len(text), heading, page))
        offset += len(text)
    return "".join(pieces), sections


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without a BOM) or BOM-marked UTF-16 text, newlines as \\n."""
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            text = data.decode("utf-16")
        else:
            text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it, "
            "e.g. `iconv -f SHIFT_JIS -t UTF-8`"
        ) from None
    if "\x00" in text:
        raise DocumentError("binary data (NUL bytes) in a text file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path, data: bytes) -> Document:
    text = decode_text(data)
    return Document(path, text, [Section(0, len(text))])


_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
# YAML front matter (Jekyll, Hugo, Obsidian): metadata, not text, before the document proper.
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)
_FRONT_TITLE = re.compile(r"^title:[ \t]*(.+?)[ \t]*$", re.M)


def read_markdown(path: Path, data: bytes) -> Document:
    """One section per heading (`# A` ... `###### F`, or a line underlined with `===` / `---`,
    outside code fences); a section's heading is its path of titles, "A > B". The text is the
    file's, headings included; YAML front matter is left out of the sections, its `title:` is
    the document's title (else the first level-1 heading)."""
    text = decode_text(data)
    sections: list[Section] = []
    trail: list[tuple[int, str]] = []  # (level, title) of the headings above this point
    front = _FRONT_MATTER.match(text)
    named = _FRONT_TITLE.search(front.group(1) or "") if front else None
    title = (named.group(1).strip("\"'") or None) if named else None
    start = offset = front.end() if front else 0
    heading, fence = None, None
    paragraph: list[str] = []  # the lines of the paragraph being read (a setext heading's text)
    paragraph_start = offset

    def open_section(at: int, level: int, name: str) -> None:
        nonlocal start, heading, trail, title
        if level == 1 and title is None:
            title = name
        if at > start:
            sections.append(Section(start, at, heading))
        trail = [(lv, t) for lv, t in trail if lv < level] + [(level, name)]
        start, heading = at, " > ".join(t for _, t in trail)

    for line in text[offset:].splitlines(keepends=True):
        bare = line.rstrip("\n")
        found = _FENCE.match(line)
        if found:
            fence = None if fence == found.group(1) else (fence or found.group(1))
            paragraph = []
        elif fence is not None:
            pass
        elif match := _ATX_HEADING.match(bare):
            open_section(offset, len(match.group(1)), match[2])
            paragraph = []
        elif paragraph and (underline := _SETEXT_UNDERLINE.match(bare)):
            name = " ".join(" ".join(paragraph).split())
            open_section(paragraph_start, 1 if underline.group(1)[0] == "=" else 2, name)
            paragraph = []
        elif not bare.strip():
            paragraph = []
        else:
            if not paragraph:
                paragraph_start = offset
            paragraph.append(bare)
        offset += len(line)
    if offset > start:
        sections.append(Section(start, offset, heading))
    return Document(path, text, sections, title)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, by heading; script, style and the like are skipped."""

    SKIP = frozenset({"script", "style", "noscript", "template", "svg", "iframe", "object"})
    BLOCK = frozenset(
        ["address", "article", "aside", "blockquote", "body", "dd", "div", "dl", "dt",
         "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "li", "main",
         "nav", "ol", "p", "pre", "section", "table", "ul"]
    )  # fmt: skip
    HEADINGS = {f"h{n}": n for n in range(1, 7)}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title: str | None = None
        self.parts: list[tuple[str, str | None]] = []  # (text, heading)
        self._text: list[str] = []
        self._heading_text: list[str] | None = None
        self._trail: list[tuple[int, str]] = []
        self._skip = 0
        self._pre = 0
        self._in_title = False
        self._title_text: list[str] = []
        self._cells = 0  # cells so far in the table row being read

    def _heading(self) -> str | None:
        if self._trail:
            return " > ".join(title for _, title in self._trail)
        return self.title

    def _flush(self) -> None:
        text = "".join(self._text)
        text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if text:
            self.parts.append((text, self._heading()))
        self._text = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.HEADINGS:
            self._flush()
            self._heading_text = []
        elif tag == "br":
            self._text.append("\n")
        elif tag == "tr":  # a table row is one line, its cells separated by " | "
            self._text.append("\n")
            self._cells = 0
        elif tag in ("td", "th"):
            self._text.append(" | " if self._cells else "")
            self._cells += 1
        elif tag in self.BLOCK:
            self._text.append("\n\n")
            self._pre += tag == "pre"

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag == "br":
            self._text.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
            self.title = " ".join("".join(self._title_text).split()) or None
        elif tag in self.HEADINGS and self._heading_text is not None:
            title = " ".join("".join(self._heading_text).split())
            self._heading_text = None
            if title:
                level = self.HEADINGS[tag]
                self._trail = [(lv, t) for lv, t in self._trail if lv < level] + [(level, title)]
                self._text.append(title + "\n\n")
        elif tag in self.BLOCK:
            self._text.append("\n\n")
            if tag == "pre":
                self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in_title:
            self._title_text.append(data)
        elif self._heading_text is not None:
            self._heading_text.append(data)
        else:
            self._text.append(data if self._pre else re.sub(r"\s+", " ", data))

    def close(self) -> None:
        super().close()
        self._flush()


# <meta charset="..."> or <meta http-equiv="Content-Type" content="...; charset=...">, and
# XHTML's <?xml encoding="..."?>: a page's declared encoding, looked for in its first bytes.
_DECLARED_CHARSET = re.compile(
    rb"""<meta\b[^>]*?charset\s*=\s*["']?\s*([\w.:-]+)|<\?xml\b[^>]*?encoding\s*=\s*["']([\w.:-]+)""",
    re.I,
)
# Labels whose WHATWG encoding is a superset that Python names otherwise (browsers decode these
# pages with the superset; the strict codec fails on their extra characters).
_CHARSET_SUPERSETS = {
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932",
    "windows-31j": "cp932", "iso-8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252",
    "us-ascii": "cp1252", "ascii": "cp1252", "gb2312": "gb18030", "gbk": "gb18030",
    "euc-kr": "cp949", "ks_c_5601-1987": "cp949",
}  # fmt: skip


def decode_html(data: bytes) -> str:
    """An HTML page's text: by its byte order mark, else the charset its <meta> (or XML
    declaration) names, else UTF-8 (see decode_text)."""
    declared = _DECLARED_CHARSET.search(data[:4096])
    if declared is None or data.startswith(
        (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    ):
        return decode_text(data)
    name = (declared.group(1) or declared.group(2)).decode("ascii").lower()
    name = _CHARSET_SUPERSETS.get(name, name)
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise DocumentError(f"unknown charset {name!r} declared in the page") from None
    if codec.startswith("utf-16"):  # a page read as bytes is not UTF-16 without a BOM
        return decode_text(data)
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"not {name} text as the page declares (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_html(path: Path, data: bytes) -> Document:
    """Visible text (no script / style), one section per h1-h6 heading; the <title> is the
    document's title and the heading of text before the first heading. The page's declared
    charset is honoured."""
    parser = _HTMLText()
    parser.feed(decode_html(data))
    parser.close()
    text, sections = _join([(text, heading, None) for text, heading in parser.parts])
    return Document(path, text, sections, parser.title)


@contextlib.contextmanager
def _quiet_pypdf() -> Iterator[None]:
    # pypdf logs a warning for every irregularity it repairs; the failure, if any, is reported.
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_pdf(path: Path, data: bytes) -> Document:
    """Text of every page (pypdf), one section per page, pages numbered from 1."""
    import pypdf

    try:
        with _quiet_pypdf():
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise DocumentError("encrypted PDF (a password is needed)")
            pages = [(page.extract_text() or "").replace("\x00", "") for page in reader.pages]
            title = reader.metadata.title if reader.metadata else None
    except DocumentError:
        raise
    except Exception as e:  # pypdf raises many types on a damaged file; all mean "unreadable"
        raise DocumentError(f"unreadable PDF ({type(e).__name__}: {e})") from None
    if pages and not any(page.strip() for page in pages):
        raise DocumentError(
            f"no text layer in its {len(pages)} page(s) (a scan? run OCR on it first, e.g. "
            "`ocrmypdf`)"
        )
    text, sections = _join([(page, None, n) for n, page in enumerate(pages, 1)])
    return Document(path, text, sections, title if isinstance(title, str) else None)


READERS: dict[str, Callable[[Path, bytes], Document]] = {
    ".txt": read_text,
    ".text": read_text,
    ".md": read_markdown,
    ".markdown": read_markdown,
    ".html": read_html,
    ".htm": read_html,
    ".pdf": read_pdf,
}


def read_document(path: Path, data: bytes | None = None) -> Document:
    """A file's text and sections, by its extension; DocumentError when it cannot be read."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DocumentError(
            f"unsupported file type {path.suffix or '(none)'!r} "
            f"(supported: {', '.join(sorted(READERS))})"
        )
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DocumentError(e.strerror or str(e)) from None
    return reader(path, data)


def find_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Absolute paths of the files named and of the supported files under the directories
    named (recursively, hidden entries skipped), in order, without duplicates."""
    found: dict[Path, None] = {}
    for given in paths:
        path = resolve_path(given)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in READERS:
                        found[Path(root) / name] = None
        elif path.exists() or path.is_symlink():  # a broken or looping link: reported
            found[path] = None
        else:
            raise SoraiError(f"no such file or directory: {given}")
    return list(found)


@dataclass
class AddReport:
    """What `add_files` did; failures are (path, why)."""

    added: int = 0
    updated: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0
    read_seconds: float = 0.0  # reading, parsing and chunking
    embed_seconds: float = 0.0
    write_seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def summary(self) -> str:
        return (
            f"{self.added} added, {self.updated} updated, {self.skipped} unchanged, "
            f"{self.failed} failed; {plural(self.chunks, 'chunk')} written "
            f"(read {self.read_seconds:.1f}s, embed {self.embed_seconds:.1f}s, "
            f"write {self.write_seconds:.1f}s)"
        )


@dataclass
class _Pending:
    """A file read and chunked, waiting for its vectors."""

    path: Path
    sha256: str
    mtime: float
    title: str | None
    chunks: list[Chunk]
    replaces: bool


def _prepare(index: Index, path: Path, chunk_size: int, overlap: int) -> _Pending | str | None:
    """The file read and chunked; None when the index has it already (same bytes, same
    chunk sizes); why, when it cannot be indexed."""
    try:
        data = path.read_bytes()
        mtime = path.stat().st_mtime
    except OSError as e:
        return e.strerror or str(e)
    digest = hashlib.sha256(data).hexdigest()
    known = index.document(str(path))
    if known and (known.sha256, known.chunk_size, known.overlap) == (digest, chunk_size, overlap):
        return None
    try:
        document = read_document(path, data)
    except DocumentError as e:
        return str(e)
    chunks = chunk_text(document.text, document.sections, chunk_size, overlap)
    if not chunks:
        return "no text to index"
    return _Pending(path, digest, mtime, document.title, chunks, known is not None)


def add_files(
    index: Index,
    paths: Sequence[str | os.PathLike],
    embedder: Embedder,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    progress: Callable[[str], None] | None = None,
) -> AddReport:
    """Index files and directories: new files are added, changed ones (another sha256, or
    other chunk sizes) replaced, unchanged ones skipped, unreadable ones reported and left out.
    Small files share embedding calls; each file is written in its own transaction. An
    embedding failure stops the run (the files written before it stay)."""
    check_sizes(chunk_size, overlap)
    index.check_embedding_model(embedder.embedding_model)
    files = find_files(paths)
    window: list[int | None] = []  # asked at the first embedding: none when nothing changed
    say = progress or (lambda message: None)
    report = AddReport()
    pending: list[_Pending] = []
    done = 0

    def flush() -> None:
        nonlocal done
        if not pending:
            return
        texts = [chunk.text for item in pending for chunk in item.chunks]
        started = time.perf_counter()
        if not window:
            window.append(embedding_window(embedder))
        try:
            vectors = embed_texts(embedder, texts, window[0])
        except ValueError as e:
            raise SoraiError(str(e)) from None
        report.embed_seconds += time.perf_counter() - started
        started = time.perf_counter()
        at = 0
        for item in pending:
            count = len(item.chunks)
            index.put_document(
                str(item.path),
                sha256=item.sha256,
                mtime=item.mtime,
                title=item.title,
                chunk_size=chunk_size,
                overlap=overlap,
                chunks=item.chunks,
                vectors=vectors[at : at + count],
                embedding_model=embedder.embedding_model,
            )
            at += count
            done += 1
            report.chunks += count
            report.updated += item.replaces
            report.added += not item.replaces
            verb = "updated" if item.replaces else "added"
            say(f"[{done}/{len(files)}] {verb} {item.path} ({plural(count, 'chunk')})")
        report.write_seconds += time.perf_counter() - started
        pending.clear()

    for path in files:
        started = time.perf_counter()
        prepared = _prepare(index, path, chunk_size, overlap)
        report.read_seconds += time.perf_counter() - started
        if isinstance(prepared, _Pending):
            pending.append(prepared)
            if sum(len(item.chunks) for item in pending) >= EMBED_BATCH:
                flush()
            continue
        done += 1
        if prepared is None:
            report.skipped += 1
            say(f"[{done}/{len(files)}] unchanged {path}")
        else:
            report.failures.append((str(path), prepared))
            say(f"[{done}/{len(files)}] failed {path}: {prepared}")
    flush()
    return report
