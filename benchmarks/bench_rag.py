"""The document index: indexing throughput, vector search latency against a peer on the same
vectors (faiss IndexFlatIP, else NumPy brute force), and recall@10 of hybrid / vector / keyword
search on a labelled synthetic corpus.

    python benchmarks/bench_rag.py [--chunks 10000] [--url http://127.0.0.1:8000]

Without --url the vectors are hashed character trigrams (384 dims, normalized; content-aware
enough to make recall mean something, but not a language model) or, with --vectors random,
random normalized vectors. faiss is not a dependency: `pip install faiss-cpu` to compare with it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import without_nan  # noqa: E402

from sorai.apps.rag import Index, add_files, search  # noqa: E402

DIMENSION = 384
# Consonant-vowel(-consonant) syllables over the whole alphabet: words with as varied
# trigrams as a natural language's, drawn with Zipf frequencies.
SYLLABLES = [c + v + e for c in "bcdfghjklmnprstvwz" for v in "aeiou" for e in ["", "", "n", "r"]]
KANA = "アイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモラリルレロ"
FILLER_EN = ["the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as",
             "by", "at", "from", "it", "this", "which", "be", "are", "has", "had", "were", "its",
             "into", "over", "under", "after", "before", "between", "during"]  # fmt: skip
FILLER_JA = list("日月火水木金土山川田本人大中小上下学生年時国語話見行来出入会社電車")
FILLER_JA_KANA = list("のにはをがでとものこれそれあるいうしたですますから")


# -- embedders ------------------------------------------------------------------------------


class HashedTrigramEmbedder:
    """Character trigrams hashed into signed buckets, L2-normalized (vectorized in NumPy)."""

    embedding_model = "bench-hashed-trigrams-384"

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            codes = np.frombuffer(f"  {text.lower()}  ".encode("utf-32-le"), dtype=np.uint32)
            codes = codes.astype(np.uint64)
            h = (codes[:-2] * 1_000_003 + codes[1:-1]) * 1_000_003 + codes[2:]
            h = (h * 0x9E3779B97F4A7C15) >> np.uint64(32)
            signs = np.where(h & np.uint64(1), 1.0, -1.0)
            vector = np.bincount((h >> np.uint64(1)) % DIMENSION, signs, DIMENSION)
            out.append((vector / (np.linalg.norm(vector) or 1.0)).astype(np.float32))
        return out


class RandomEmbedder:
    """Random normalized vectors, seeded by the text (the same text, the same vector)."""

    embedding_model = "bench-random-384"

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(DIMENSION)
            out.append((v / np.linalg.norm(v)).astype(np.float32))
        return out


class TimedEmbedder:
    """Counts the time spent in the wrapped embedder; serves queries it has seen from memory
    when `cache` is on (search latency without the embedding call)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.embedding_model = inner.embedding_model
        self.seconds = 0.0
        self.cache: dict[str, list] | None = None

    def embed(self, texts: list[str]):
        if self.cache is not None and all(t in self.cache for t in texts):
            return [self.cache[t] for t in texts]
        started = time.perf_counter()
        vectors = self.inner.embed(texts)
        self.seconds += time.perf_counter() - started
        if self.cache is not None:
            self.cache.update(zip(texts, vectors, strict=True))
        return vectors


# -- the labelled synthetic corpus ----------------------------------------------------------


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def _name(rng: random.Random) -> str:
    return _word(rng).capitalize() + _word(rng)


def _kana_name(rng: random.Random) -> str:
    return "".join(rng.choice(KANA) for _ in range(rng.randint(3, 5)))


def _typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(1, len(word) - 1)
    return word[:i] + word[i + 1 :]


def make_facts(rng: random.Random, count: int) -> list[dict]:
    """Facts to hide in the filler, each with a paraphrased question; a third of the English
    questions misspell the name (keyword search misses those; vectors may not)."""
    facts = []
    for n in range(count):
        if n % 3 == 2:
            name, place, year = _kana_name(rng), _kana_name(rng), rng.randint(1800, 2020)
            books = rng.randint(2, 90)
            fact = f"{name}図書館は{year}年に{place}市で開館し、蔵書は約{books}万冊である。"
            query = f"{name}図書館はいつ開館しましたか"
            kind = "japanese"
        else:
            name, place = _name(rng), _name(rng)
            year, length = rng.randint(1800, 2020), rng.randint(50, 2000)
            template = n % 2
            if template:
                fact = (
                    f"The {name} bridge near {place} was completed in {year} "
                    f"and is {length} meters long."
                )
                query_name = _typo(rng, name) if rng.random() < 0.33 else name
                query = f"When was the {query_name} bridge finished?"
            else:
                fact = f"{_name(rng)} founded the {name} observatory in {place} in {year}."
                query_name = _typo(rng, name) if rng.random() < 0.33 else name
                query = f"Who started the {query_name} observatory?"
            kind = "english-typo" if query_name != name else "english"
        facts.append({"fact": fact, "query": query, "kind": kind})
    return facts


def _filler_en(rng: random.Random, vocabulary: list[str], weights: list[float]) -> str:
    count = rng.randint(8, 20)
    words = rng.choices(vocabulary, weights, k=count)
    words = [rng.choice(FILLER_EN) if rng.random() < 0.4 else word for word in words]
    return " ".join(words).capitalize() + "."


def _filler_ja(rng: random.Random) -> str:
    chars = [
        rng.choice(FILLER_JA) if rng.random() < 0.5 else rng.choice(FILLER_JA_KANA)
        for _ in range(rng.randint(15, 40))
    ]
    return "".join(chars) + "。"


def write_corpus(folder: Path, target_chunks: int, facts: list[dict], seed: int) -> None:
    """Files of filler paragraphs (~10.8 kB: about 20 chunks of 800 characters, overlap 100),
    one in ten Japanese, with the facts scattered among them."""
    rng = random.Random(seed)
    vocabulary = [_word(rng) for _ in range(5000)]
    weights = [1 / rank for rank in range(1, len(vocabulary) + 1)]
    files = max(1, target_chunks // 20)
    per_file: list[list[str]] = [[] for _ in range(files)]
    for fact in facts:
        japanese = fact["kind"] == "japanese"
        candidates = [i for i in range(files) if (i % 10 == 0) == japanese] or [0]
        per_file[rng.choice(candidates)].append(fact["fact"])
    for i in range(files):
        japanese = i % 10 == 0
        paragraphs = []
        size = 0
        while size < 20 * 540:  # chunks start ~540 characters apart on average
            sentences = [
                _filler_ja(rng) if japanese else _filler_en(rng, vocabulary, weights)
                for _ in range(rng.randint(3, 7))
            ]
            paragraphs.append(("" if japanese else " ").join(sentences))
            size += len(paragraphs[-1]) + 2
        for fact in per_file[i]:
            p = rng.randrange(len(paragraphs))
            joiner = "" if japanese else " "
            paragraphs[p] = joiner.join([paragraphs[p], fact])
        (folder / f"doc{i:05d}.{'txt' if i % 2 else 'md'}").write_text("\n\n".join(paragraphs))


# -- measurements ---------------------------------------------------------------------------


def index_mb(path: Path) -> float:
    """The index's size on disk, write-ahead log included."""
    wal = path.with_name(path.name + "-wal")
    return (path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)) / 1e6


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "p50_ms": statistics.median(ms),
        "p95_ms": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))],
        "mean_ms": statistics.fmean(ms),
    }


def peer_search(matrix: np.ndarray):
    """(name, search(query, k) -> ids) over the same matrix."""
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(1)
        flat = faiss.IndexFlatIP(matrix.shape[1])
        flat.add(np.ascontiguousarray(matrix))

        def run(query: np.ndarray, k: int) -> list[int]:
            return flat.search(query.reshape(1, -1), k)[1][0].tolist()

        return f"faiss {faiss.__version__} IndexFlatIP (1 thread)", run

    def brute(query: np.ndarray, k: int) -> list[int]:
        scores = matrix @ query
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])].tolist()

    return "NumPy brute force (faiss not installed)", brute


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000, help="corpus size (default 10000)")
    parser.add_argument("--facts", type=int, default=300, help="labelled questions")
    parser.add_argument("--rounds", type=int, default=3, help="latency passes over the queries")
    parser.add_argument("--url", default=None, help="an OpenAI-compatible embeddings endpoint")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--embedding-model", default=None)
    parser.add_argument("--vectors", choices=["hashed", "random"], default="hashed",
                        help="without --url (default: hashed)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()

    if args.url:
        from sorai.apps.client import DEFAULT_EMBEDDING_MODEL, Client

        name = args.embedding_model or DEFAULT_EMBEDDING_MODEL
        inner = Client.connect(args.url, args.api_key, model=name, embedding_model=name)
        vectors_used = f"{name} from {args.url}"
    elif args.vectors == "random":
        inner = RandomEmbedder()
        vectors_used = "random normalized vectors, 384 dims (no --url; vector recall is chance)"
    else:
        inner = HashedTrigramEmbedder()
        vectors_used = (
            "hashed character trigrams, 384 dims, normalized (no --url: a stand-in for an "
            "embedding model, not one)"
        )
    embedder = TimedEmbedder(inner)
    print(f"vectors: {vectors_used}")
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    results: dict = {"vectors": vectors_used, "chunks_target": args.chunks}

    rng = random.Random(args.seed)
    facts = make_facts(rng, args.facts)
    with tempfile.TemporaryDirectory(prefix="bench-rag-") as tmp:
        folder = Path(tmp) / "corpus"
        folder.mkdir()
        write_corpus(folder, args.chunks, facts, args.seed)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"corpus: {len(list(folder.iterdir()))} files, {size / 1e6:.1f} MB")

        # 1. indexing throughput
        with Index(Path(tmp) / "bench.sqlite") as index:
            started = time.perf_counter()
            report = add_files(index, [folder], embedder)
            total = time.perf_counter() - started
            chunks = report.chunks
            without_embedding = total - embedder.seconds
            print(
                f"\nindexing: {chunks} chunks in {total:.1f}s = {chunks / total:.0f} chunks/s; "
                f"embedding {embedder.seconds:.1f}s, the rest (read + chunk + SQLite/FTS5 "
                f"write) {without_embedding:.1f}s = {chunks / without_embedding:.0f} chunks/s "
                f"(read {report.read_seconds:.1f}s, write {report.write_seconds:.1f}s); "
                f"index file {index_mb(index.path):.0f} MB"
            )
            results["indexing"] = {
                "chunks": chunks,
                "seconds": total,
                "chunks_per_s": chunks / total,
                "embed_seconds": embedder.seconds,
                "chunks_per_s_without_embedding": chunks / without_embedding,
                "read_seconds": report.read_seconds,
                "write_seconds": report.write_seconds,
                "index_mb": index_mb(index.path),
            }

            # 2. vector search latency, sorai vs a peer on the same matrix, same queries
            queries = [fact["query"] for fact in facts]
            embedder.cache = {}
            query_started = time.perf_counter()
            query_vectors = [np.asarray(v, dtype=np.float32) for v in embedder.embed(queries)]
            query_embed = (time.perf_counter() - query_started) / len(queries)
            ids, matrix = index.vectors()  # the very matrix sorai searches
            peer_name, peer = peer_search(matrix)
            with Index(index.path) as fresh:  # the first search loads the matrix
                load_started = time.perf_counter()
                fresh.nearest(query_vectors[0], 10)
                load_seconds = time.perf_counter() - load_started

            def ours(q: np.ndarray) -> list[int]:
                return [chunk_id for chunk_id, _ in index.nearest(q, 10)]

            def theirs(q: np.ndarray) -> list[int]:
                return [int(ids[i]) for i in peer(q, 10)]

            sorai_times, peer_times, agree = [], [], 0
            for round_ in range(args.rounds):
                for q in query_vectors:
                    runs = [(ours, sorai_times), (theirs, peer_times)]
                    answers = {}
                    for run, times in runs if round_ % 2 == 0 else runs[::-1]:
                        started = time.perf_counter()
                        answers[run] = run(q)
                        times.append(time.perf_counter() - started)
                    agree += answers[ours] == answers[theirs]
            ours_p, peer_p = percentiles(sorai_times), percentiles(peer_times)
            print(
                f"\nvector search over {len(ids)} x {matrix.shape[1]} (exact top-10, "
                f"{len(sorai_times)} queries, query embedding excluded):"
            )
            print(f"  {'sorai Index.nearest':40} p50 {ours_p['p50_ms']:.3f} ms  "
                  f"p95 {ours_p['p95_ms']:.3f} ms")  # fmt: skip
            print(f"  {peer_name:40} p50 {peer_p['p50_ms']:.3f} ms  "
                  f"p95 {peer_p['p95_ms']:.3f} ms")  # fmt: skip
            ratio = peer_p["p50_ms"] / ours_p["p50_ms"]
            print(
                f"  sorai/peer speed at p50: {ratio:.2f}x (>1: sorai faster); same top-10 "
                f"in {agree}/{len(sorai_times)}; loading the matrix from SQLite: "
                f"{load_seconds * 1000:.0f} ms (once, then cached)"
            )
            results["vector_search"] = {
                "sorai": ours_p,
                "peer": {"name": peer_name, **peer_p},
                "sorai_over_peer_speed_p50": ratio,
                "same_top10": agree / len(sorai_times),
                "matrix_load_ms": load_seconds * 1000,
                "query_embedding_ms": query_embed * 1000,
            }

            # 3. end-to-end search latency and recall@10 per mode
            db = sqlite3.connect(index.path)  # the labels: chunks that hold the whole fact
            relevant = [
                {row[0] for row in db.execute(
                    "SELECT id FROM chunks WHERE instr(text, ?) > 0", (fact["fact"],))}
                for fact in facts
            ]  # fmt: skip
            db.close()
            print(f"\nsearch() end to end, top 10 (query embedding cached), recall@10 on "
                  f"{len(facts)} labelled questions:")  # fmt: skip
            kinds = sorted({fact["kind"] for fact in facts})
            header = f"  {'mode':8} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10}"
            print(header + "".join(f" {kind:>13}" for kind in kinds))
            results["search"] = {}
            for mode in ("hybrid", "vector", "keyword"):
                times, hits = [], {kind: [] for kind in kinds}
                for fact, query, good in zip(facts, queries, relevant, strict=True):
                    started = time.perf_counter()
                    found = search(index, query, embedder, k=10, mode=mode)
                    times.append(time.perf_counter() - started)
                    hits[fact["kind"]].append(bool(good & {r.chunk_id for r in found}))
                p = percentiles(times)
                every = [h for kind in kinds for h in hits[kind]]
                recall = sum(every) / len(every)
                by_kind = {kind: sum(hits[kind]) / len(hits[kind]) for kind in kinds}
                print(
                    f"  {mode:8} {p['p50_ms']:8.2f} {p['p95_ms']:8.2f} {recall:10.3f}"
                    + "".join(f" {by_kind[kind]:13.3f}" for kind in kinds)
                )
                results["search"][mode] = {**p, "recall_at_10": recall, "by_kind": by_kind}
            counts = {kind: sum(fact["kind"] == kind for fact in facts) for kind in kinds}
            print(f"  (questions per kind: {counts})")

    if args.json:
        Path(args.json).write_text(json.dumps(without_nan(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
