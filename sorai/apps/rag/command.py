"""`sorai index add|search|list|remove`: the command line over the document index."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from sorai.apps.command import add_endpoint_args, connect, say, shown
from sorai.apps.rag.chunk import DEFAULT_CHUNK_SIZE, DEFAULT_OVERLAP, check_sizes
from sorai.apps.rag.ingest import add_files, find_files
from sorai.apps.rag.search import MODES, search
from sorai.apps.rag.store import Index, default_index_path
from sorai.apps.text import plural

DESCRIPTION = """\
A persistent hybrid index over your documents (.txt, .md, .html, .pdf): keyword search (BM25
over an SQLite FTS5 trigram index, so Japanese works without word splitting) and vector search
(embeddings from an OpenAI-compatible /v1/embeddings endpoint), fused by reciprocal rank.

examples:
  sorai index add docs/ notes.md manual.pdf       # directories are walked recursively
  sorai index add docs/ --url http://127.0.0.1:8000/v1   # embeddings from a running server
  sorai index search "how do I rotate the keys?" -k 5
  sorai index search "東京" --mode keyword         # no endpoint needed
  sorai index list
  sorai index remove docs/old/
"""


def _add_index_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index",
        default=None,
        metavar="FILE",
        help=f"the index file (default: {default_index_path()}; $SORAI_HOME moves it)",
    )


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "index",
        help="index documents and search them (keyword + vector)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(index_parser=parser)
    actions = parser.add_subparsers(dest="index_action", metavar="<action>")

    add = actions.add_parser("add", help="add or update files and directories")
    add.add_argument("paths", nargs="+", metavar="PATH")
    _add_index_arg(add)
    add.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="characters (default: 800)"
    )
    add.add_argument(
        "--overlap", type=int, default=DEFAULT_OVERLAP, help="characters (default: 100)"
    )
    add_endpoint_args(add, chat=False, embeddings=True)

    find = actions.add_parser("search", help="the chunks that best match a query")
    find.add_argument("query")
    _add_index_arg(find)
    find.add_argument("-k", type=int, default=10, help="results (default: %(default)s)")
    find.add_argument(
        "--mode",
        choices=MODES,
        default="hybrid",
        help="keyword needs no endpoint (default: %(default)s)",
    )
    find.add_argument("--json", action="store_true", help="one JSON array on stdout")
    add_endpoint_args(find, chat=False, embeddings=True)

    listing = actions.add_parser("list", help="the indexed files")
    _add_index_arg(listing)
    listing.add_argument("--json", action="store_true", help="one JSON array on stdout")

    remove = actions.add_parser("remove", help="remove files, or everything under directories")
    remove.add_argument("paths", nargs="+", metavar="PATH")
    _add_index_arg(remove)
    return parser


class _Deferred:
    """An embedder that connects at its first use, so `index add` of unchanged files starts
    no server."""

    def __init__(self, connect: Callable[[], Any], embedding_model: str) -> None:
        self._connect, self._client = connect, None
        self.embedding_model = embedding_model

    def _connected(self):
        if self._client is None:
            self._client = self._connect()
        return self._client

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self._connected().embed(texts)

    def context_length(self, model: str | None = None) -> int | None:
        return self._connected().context_length(model)

    def __enter__(self) -> _Deferred:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()


def _embedder(args: argparse.Namespace, index: Index) -> _Deferred:
    from sorai.apps.client import DEFAULT_EMBEDDING_MODEL

    name = args.embedding_model or index.embedding_model or DEFAULT_EMBEDDING_MODEL
    return _Deferred(lambda: connect(args, embedding_model=name, chat=False), name)


def _add(args: argparse.Namespace) -> int:
    # The arguments' errors before the index file is made and the server started (seconds).
    check_sizes(args.chunk_size, args.overlap)
    find_files(args.paths)
    with Index(args.index) as index, _embedder(args, index) as embedder:
        report = add_files(index, args.paths, embedder, args.chunk_size, args.overlap, say)
        for path, why in report.failures:
            say(f"failed: {shown(path)}: {why}")
        print(f"{report.summary()}; index {index.path}: {plural(index.chunk_count(), 'chunk')}")
    return 1 if report.failed else 0


def _search(args: argparse.Namespace) -> int:
    with Index(args.index, create=False) as index:
        if args.mode == "keyword":
            results = search(index, args.query, k=args.k, mode="keyword")
        else:
            with _embedder(args, index) as embedder:
                results = search(index, args.query, embedder, k=args.k, mode=args.mode)
    if args.json:
        print(json.dumps([asdict(r) for r in results], ensure_ascii=False, indent=2))
        return 0
    for n, r in enumerate(results, 1):
        where = shown(r.path) + (f"  p.{r.page}" if r.page else "")
        where += f"  § {r.heading}" if r.heading else ""
        ranks = f"vector #{r.vector_rank or '-'}, keyword #{r.keyword_rank or '-'}"
        print(f"{n:>2}. {r.score:.4f}  {where}  ({ranks})")
        text = " ".join(r.text.split())
        print(f"    {text[:300]}{'…' if len(text) > 300 else ''}")
    if not results:
        say("no matches")
    return 0


def _list(args: argparse.Namespace) -> int:
    with Index(args.index, create=False) as index:
        documents = index.documents()
        model, dimension, chunks = index.embedding_model, index.dimension, index.chunk_count()
        path = index.path
    if args.json:
        print(json.dumps([asdict(d) for d in documents], ensure_ascii=False, indent=2))
        return 0
    print(f"{'CHUNKS':>6}  {'ADDED':16}  PATH")
    for d in documents:
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.added_at))
        print(f"{d.n_chunks:>6}  {added:16}  {shown(d.path)}")
    vectors = f"{model}, {dimension} dims" if model else "no vectors yet"
    say(f"{plural(len(documents), 'file')}, {plural(chunks, 'chunk')} in {path} ({vectors})")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with Index(args.index, create=False) as index:
        removed = [p for path in args.paths for p in index.remove(path)]
        left = index.chunk_count()
    for path in removed:
        say(f"removed {shown(path)}")
    print(f"{plural(len(removed), 'file')} removed; {plural(left, 'chunk')} left")
    if not removed:
        say(f"nothing indexed at {', '.join(args.paths)} (`sorai index list` shows what is)")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"add": _add, "search": _search, "list": _list, "remove": _remove}
    action = actions.get(args.index_action)
    if action is None:
        args.index_parser.print_help(sys.stderr)
        return 2
    return action(args)
