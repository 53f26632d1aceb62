"""search_documents over a real `sorai index`, embedded by the session's endpoint."""

from __future__ import annotations

import pytest

from sorai.apps.agent.builtin import build_tools
from sorai.apps.rag import Index, add_files
from sorai.errors import SoraiError


def test_search_documents_finds_the_passage(client, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "warranty.md").write_text(
        "# Warranty\n\nThe ABC blender comes with a warranty of 90 days.\n"
    )
    (docs / "shipping.txt").write_text("Orders ship within two business days.\n")
    with Index(tmp_path / "docs.sqlite") as index:
        assert add_files(index, [docs], client).failures == []
    (search,) = build_tools(["search_documents"], None, client, tmp_path / "docs.sqlite")
    result = search({"query": "blender warranty", "k": 1})
    assert result.ok and result.output.startswith("[1] ")
    assert "warranty.md" in result.output and "90 days" in result.output


def test_a_missing_index_is_an_error_up_front(tmp_path):
    with pytest.raises(SoraiError, match="no index at"):
        build_tools(["search_documents"], None, None, tmp_path / "none.sqlite")
