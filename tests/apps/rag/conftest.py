"""Fixtures for the index tests: a deterministic stand-in embedder and a writer of real PDFs."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from sorai.apps.rag.store import Index


class TrigramHashEmbedder:
    """Test double for the real embedding model (all-MiniLM-L6-v2 behind /v1/embeddings, which
    test_embed.py and the skills tests use): fast and exact enough for the index's own logic.

    Each lower-cased character trigram is hashed (crc32, so runs agree) into one of 384
    signed buckets and the sum is L2-normalized: texts that share most of their words, such as
    a query and its paraphrase, get the highest cosine. Deterministic, no model, no network.
    """

    def __init__(self, name: str = "test-trigram-hash", dimension: int = 384) -> None:
        self.embedding_model = name
        self.dimension = dimension
        self.texts_embedded = 0

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.texts_embedded += len(texts)
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {' '.join(text.lower().split())}  "
            for i in range(len(padded) - 2):
                code = zlib.crc32(padded[i : i + 3].encode())
                vectors[row, code % self.dimension] += 1.0 if code & 0x80000000 else -1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.where(norms > 0, norms, 1)).tolist()


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF: one page per item, each line drawn in Helvetica (Latin-1 text)."""
    objects: list[bytes] = []
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{i} 0 R" for i in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for page_id, lines in zip(page_ids, pages, strict=True):
        shown = " T* ".join(f"{_pdf_string(line)} Tj" for line in lines)
        stream = f"BT /F1 11 Tf 14 TL 72 740 Td {shown} ET".encode("latin-1")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {page_id + 1} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


@pytest.fixture
def embedder() -> TrigramHashEmbedder:
    return TrigramHashEmbedder()


@pytest.fixture
def index(tmp_path: Path):
    with Index(tmp_path / "index.sqlite") as opened:
        yield opened
