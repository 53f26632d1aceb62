"""Online serving: sorai's server vs llama.cpp's own llama-server, same GGUF, same work.

    python benchmarks/bench_serving.py [--concurrency 1,4,16] [--max-tokens 64] [--requests 32]
        [--peers sorai,llama-server,transformers] [--sorai-args "..."] [--sorai-url URL]
        [--llama-cpp-url URL] [--json out.json]

Peers, run one after another (never two servers at once, so they do not share the cores):

- sorai: `sorai serve --model M` on a free loopback port (`--sorai-args` adds flags, e.g.
  "--quantize none"; `--sorai-url` measures a running one);
- llama-server: llama.cpp's own server, built from source once (benchmarks/llama_cpp_peer.py),
  as `llama-server -m GGUF -np 16 -c 8192 -t <cores>` on the same GGUF file (`--llama-cpp-url`
  measures a running one, `--llama-cpp-threads` sets -t);
- transformers (only with `--peers ...,transformers`): `generate` on the same GGUF in float32,
  one stream, greedy: (N - 1) / (median time(N tokens) - median time(1 token)).

Workload: the same fixed list of chat prompts for every server (built here with a fixed seed,
~35-300 prompt tokens; each request of a run gets its own, so a prefix cache helps only with
what real traffic shares), temperature 0, `--max-tokens` each, every request streamed with
`stream_options.include_usage`. Each concurrency level keeps C requests in flight until it has
sent `--requests` (default 32) or `--level-time` seconds have passed (then in-flight
requests are cut: their tokens still count toward tokens/s, they count in no latency).

Per request: TTFT (request sent -> first content chunk), TPOT ((e2e - TTFT) / (tokens - 1)),
ITL (gaps between content chunks), e2e. Output tokens are the server's `usage.completion_tokens`
(the count of content chunks where a server sends no usage); both peers get `ignore_eos` (unless
`--no-ignore-eos`), so every answer is `--max-tokens` long. Per level: output tokens/s = all
output tokens / wall time of the level; decode tok/s = 1 / mean TPOT. An answer of another
length (a peer that ignores `ignore_eos`) is counted and flagged. Each server is started once and
stopped, then started again for the run: that second, warm start (spawn -> healthy) is the one
timed (`--single-start` skips the first). After the run its peak RSS (VmHWM of the server
process) is read. The report prints the CPU's flags, the load average, the llama.cpp version,
the table, the ratios and the goals.

The HTTP client is a small asyncio HTTP/1.1 + SSE reader over the standard library: on a 2-core
machine a heavier client would take CPU from the server it measures, and it stamps each chunk
as its bytes arrive. It talks to loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common import (  # benchmarks/common.py: the script's folder is on sys.path
    peer_environment,
    without_nan,
)
from llama_cpp_peer import busy_warning, cores, ensure_llama_cpp

from sorai import hub

SORAI = "sorai"
LLAMA_CPP = "llama-server"
TRANSFORMERS = "transformers"
ALL_PEERS = (SORAI, LLAMA_CPP, TRANSFORMERS)

# Goals from the speed issue (ratios against llama-server on the same machine, one run).
GOAL_THROUGHPUT_RATIO = 3.0  # sorai output tok/s at concurrency 16 vs llama-server's
GOAL_TTFT_RATIO = 1 / 3  # sorai mean TTFT at concurrency 16 vs llama-server's, at most
GOAL_DECODE_RATIO = 1.0  # sorai single-stream decode tok/s vs llama-server's, at least
GOAL_RSS_MB = 800.0  # sorai serve's peak RSS, in MB (10^6 bytes)
GOAL_READY_S = 10.0  # sorai serve: spawn -> healthy
GOAL_CONCURRENCY = 16


# ----------------------------------------------------------------------------------------------
# Workload


TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest",
    "the water cycle", "plate tectonics", "the immune system", "machine learning",
    "the Roman Empire", "climate change", "the printing press", "vaccines", "volcanoes",
    "the stock market", "renewable energy", "the human brain", "DNA replication", "jazz music",
    "the Silk Road", "quantum computing", "honeybees", "the Great Wall of China", "inflation",
    "the Moon landing", "coral reefs", "public key cryptography", "the Industrial Revolution",
    "sleep", "electric cars", "the Olympic Games", "tea", "earthquakes", "the internet",
    "Shakespeare", "rainforests", "the periodic table", "bread baking", "supply and demand",
    "the solar system", "ancient Egypt",
]  # fmt: skip

TASKS = [
    "What is {t}? Answer in a few sentences.",
    "Explain {t} to a ten-year-old.",
    "Give me three interesting facts about {t}.",
    "Why does {t} matter today?",
    "Write a short paragraph about {t}.",
    "What are the most common misconceptions about {t}?",
    "Summarise the history of {t} in simple words.",
    "How would you teach {t} in a one-hour class?",
    "List the key ideas someone should know about {t}.",
    "Compare {t} with something from everyday life.",
]

CONTEXT_SENTENCES = [
    "I am preparing a short presentation for my colleagues next week.",
    "Most of them have no background in science or history.",
    "They enjoy concrete examples more than abstract definitions.",
    "Last time I spoke for too long, so this time I want to be brief.",
    "Please avoid jargon unless you explain it right away.",
    "A few people in the audience are quite sceptical and like to ask hard questions.",
    "I would also like one surprising detail that people will remember.",
    "If there is a common mistake people make about this topic, point it out.",
    "We meet in a small room with a whiteboard but no projector.",
    "The talk is part of a series where everyone teaches something they find interesting.",
    "My own background is in accounting, so I am learning this topic myself.",
    "I read a couple of articles already but they contradicted each other.",
    "Feel free to use an analogy if it makes the idea easier to grasp.",
    "Keep in mind that some listeners are not native English speakers.",
    "I want the structure to be clear: an opening, the main point and a short close.",
    "Numbers are fine, but only a few and only if they are memorable.",
]


def build_prompts(count: int = 64, seed: int = 0) -> list[list[dict[str, str]]]:
    """`count` chat conversations, the same for a given seed: a question after some context."""
    rng = random.Random(seed)
    prompts: list[list[dict[str, str]]] = []
    seen: set[str] = set()
    while len(prompts) < count:
        topic = TOPICS[rng.randrange(len(TOPICS))]
        question = TASKS[rng.randrange(len(TASKS))].format(t=topic)
        # 0-16 sentences of context: prompts of ~35 to ~300 tokens with the chat template.
        n_context = rng.randint(0, len(CONTEXT_SENTENCES))
        context = " ".join(rng.sample(CONTEXT_SENTENCES, n_context))
        content = f"{context} {question}".strip()
        if content not in seen:  # no prompt twice
            seen.add(content)
            prompts.append([{"role": "user", "content": content}])
    return prompts


# ----------------------------------------------------------------------------------------------
# HTTP client: asyncio streams, HTTP/1.1, one connection per request, SSE lines as they come


def check_loopback(url: str) -> str:
    """The base URL without a trailing "/" or "/v1"; refuses anything but a loopback host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http":
        raise SystemExit(f"bench_serving: {url}: only plain http:// URLs are supported")
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback:
        raise SystemExit(f"bench_serving: {url}: this benchmark only talks to loopback addresses")
    base = url.rstrip("/")
    return base.removesuffix("/v1")


class HTTPError(Exception):
    pass


async def _request(
    url: str, method: str, body: dict[str, Any] | None
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter, dict[str, str]]:
    parts = urlsplit(url)
    port = parts.port or 80
    reader, writer = await asyncio.open_connection(parts.hostname, port, limit=1 << 20)
    payload = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\n"
        "Connection: close\r\nAccept: text/event-stream, application/json\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    status_line = await reader.readline()
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        writer.close()
        raise HTTPError(f"bad status line {status_line!r}") from None
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, reader, writer, headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield (await reader.readexactly(size + 2))[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(1 << 16):
            yield data


async def get_json(url: str) -> tuple[int, Any]:
    status, reader, writer, headers = await _request(url, "GET", None)
    try:
        data = b"".join([chunk async for chunk in _body(reader, headers)])
    finally:
        writer.close()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode(errors="replace")


@dataclass
class RequestResult:
    index: int
    prompt_tokens: int = 0
    output_tokens: int = 0  # usage.completion_tokens, else content chunks
    chunks: int = 0  # content chunks received
    usage_reported: bool = False
    ttft: float | None = None
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    finished: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.finished and not self.error

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def stream_chat(base: str, body: dict[str, Any], result: RequestResult) -> None:
    """POST /v1/chat/completions with stream=True; fills `result` as chunks arrive."""
    started = time.perf_counter()
    last = started
    try:
        status, reader, writer, headers = await _request(
            base + "/v1/chat/completions", "POST", body
        )
    except (OSError, HTTPError) as exc:
        result.error = f"connect: {exc}"
        result.finished = True
        return
    try:
        if status != 200:
            data = b"".join([chunk async for chunk in _body(reader, headers)])
            result.error = f"HTTP {status}: {data[:300].decode(errors='replace')}"
            return
        pending = b""
        async for data in _body(reader, headers):
            now = time.perf_counter()
            pending += data
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                event = json.loads(payload)
                if "error" in event:
                    result.error = str(event["error"])[:300]
                    continue
                usage = event.get("usage")
                if usage:
                    result.usage_reported = True
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", 0)
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        result.chunks += 1
                        if result.ttft is None:
                            result.ttft = now - started
                        else:
                            result.itls.append(now - last)
                        last = now
        if not result.usage_reported:
            result.output_tokens = result.chunks
            if not result.chunks and not result.error:
                result.error = "the stream ended with neither content nor usage"
        result.e2e = time.perf_counter() - started
        result.finished = True
    except (OSError, HTTPError, ValueError, asyncio.IncompleteReadError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.finished = True
    finally:
        writer.close()


def request_body(
    model_id: str, messages: list[dict[str, str]], max_tokens: int, ignore_eos: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_id,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return body


# ----------------------------------------------------------------------------------------------
# One concurrency level, and its summary


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


@dataclass
class LevelSummary:
    peer: str
    concurrency: int
    sent: int
    completed: int
    errors: int
    cut: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    mean_prompt_tokens: float
    ttft_mean: float
    ttft_p50: float
    ttft_p99: float
    tpot_mean: float
    itl_mean: float
    e2e_mean: float
    decode_tok_s: float  # sum(tokens - 1) / sum(e2e - TTFT): per-stream decode speed
    usage_reported: bool
    wrong_length: int = 0  # completed answers not `--max-tokens` long although ignore_eos was sent
    first_error: str = ""


def summarize(
    peer: str,
    concurrency: int,
    results: list[RequestResult],
    wall: float,
    expected_tokens: int | None = None,
) -> LevelSummary:
    """The level's figures; `expected_tokens` (sent with ignore_eos) is each answer's length."""
    ok = [r for r in results if r.ok]
    cut = [r for r in results if not r.finished]
    errors = [r for r in results if r.finished and not r.ok]
    tokens = sum(r.output_tokens for r in ok) + sum(r.chunks for r in cut)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    itls = [gap for r in ok for gap in r.itls]
    decoding = [r for r in ok if r.tpot is not None]
    decode_tokens = sum(r.output_tokens - 1 for r in decoding)
    decode_time = sum(r.e2e - (r.ttft or 0.0) for r in decoding)
    return LevelSummary(
        peer=peer,
        concurrency=concurrency,
        sent=len(results),
        completed=len(ok),
        errors=len(errors),
        cut=len(cut),
        wall_s=wall,
        output_tokens=tokens,
        output_tok_s=tokens / wall if wall > 0 else float("nan"),
        mean_prompt_tokens=mean([r.prompt_tokens for r in ok if r.usage_reported]),
        ttft_mean=mean(ttfts),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        tpot_mean=mean(tpots),
        itl_mean=mean(itls),
        e2e_mean=mean([r.e2e for r in ok]),
        decode_tok_s=decode_tokens / decode_time if decode_time > 0 else float("nan"),
        usage_reported=bool(ok) and all(r.usage_reported for r in ok),
        wrong_length=0
        if expected_tokens is None
        else sum(r.output_tokens != expected_tokens for r in ok),
        first_error=errors[0].error if errors else "",
    )


async def run_level(
    base: str,
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    time_limit: float,
) -> tuple[list[RequestResult], float]:
    """Keep `concurrency` requests in flight until all `bodies` are sent or time runs out."""
    results: list[RequestResult] = []
    started = time.perf_counter()
    deadline = started + time_limit

    async def worker() -> None:
        while len(results) < len(bodies) and time.perf_counter() < deadline:
            result = RequestResult(index=len(results))
            results.append(result)
            await stream_chat(base, bodies[result.index], result)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return results, time.perf_counter() - started


async def model_id_of(base: str, fallback: str) -> str:
    """The first model id the server lists (servers differ in what name they accept)."""
    with contextlib.suppress(OSError, HTTPError, ValueError, KeyError, IndexError, TypeError):
        status, data = await get_json(base + "/v1/models")
        if status == 200:
            return data["data"][0]["id"]
    return fallback


async def bench_server(
    peer: str, base: str, args: argparse.Namespace, summaries: list[LevelSummary]
) -> None:
    """Warm the server with one request, then run each level; appends to `summaries`."""
    model_id = await model_id_of(base, args.model)
    plan = [(c, args.requests or max(8, 2 * c)) for c in args.concurrency]
    # One prompt per request of the whole run, none sent twice: a prefix cache then helps only
    # with what real traffic shares (the chat template's system prefix), as on any server.
    prompts = build_prompts(1 + sum(n for _, n in plan), args.seed)
    bodies = [request_body(model_id, p, args.max_tokens, args.ignore_eos) for p in prompts]
    warm = RequestResult(index=-1)
    await stream_chat(base, bodies[0], warm)
    if not warm.ok:
        raise HTTPError(f"warm-up request failed: {warm.error or 'no content'}")
    if not warm.usage_reported:
        print(f"  {peer}: no usage in the stream; counting content chunks as tokens")
    if args.ignore_eos:
        honoured = "honoured" if warm.output_tokens == args.max_tokens else "NOT honoured"
        print(
            f"  {peer}: warm-up answer {warm.output_tokens} tokens for max_tokens "
            f"{args.max_tokens} (ignore_eos {honoured})"
        )
    offset = 1
    for concurrency, n_requests in plan:
        print(
            f"  {peer}: concurrency {concurrency}, {n_requests} requests "
            f"(load average {os.getloadavg()[0]:.1f}) ...",
            flush=True,
        )
        level_bodies = bodies[offset : offset + n_requests]
        offset += n_requests
        results, wall = await run_level(base, level_bodies, concurrency, args.level_time)
        expected = args.max_tokens if args.ignore_eos else None
        summary = summarize(peer, concurrency, results, wall, expected)
        summaries.append(summary)
        print(
            f"  {peer}: concurrency {concurrency}: {summary.output_tok_s:.1f} output tok/s, "
            f"mean TTFT {fmt(summary.ttft_mean)} s, {summary.completed}/{summary.sent} done "
            f"in {wall:.1f} s" + (f", {summary.cut} cut at the time limit" if summary.cut else ""),
            flush=True,
        )
        if summary.first_error:
            print(f"  {peer}: {summary.errors} errors, first: {summary.first_error}")
        if summary.wrong_length:
            print(
                f"  {peer}: WARNING {summary.wrong_length}/{summary.completed} answers are not "
                f"{args.max_tokens} tokens long: ignore_eos not honoured, the peers' work differs"
            )


# ----------------------------------------------------------------------------------------------
# Server processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


class Server:
    """A server subprocess in its own session, so it and its children die together."""

    def __init__(self, name: str, command: list[str], base: str, ready_path: str) -> None:
        self.name, self.command, self.base, self.ready_path = name, command, base, ready_path
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix=f"bench-{name}-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None  # spawn -> ready
        self.peak_rss_mb: float | None = None  # read just before it is stopped

    def start(self, timeout: float) -> None:
        print(f"  starting {self.name}: {' '.join(self.command)}  (log {self.log.name})")
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The client sends no API key, so the server must not ask for one.
            env={k: v for k, v in peer_environment().items() if k != "SORAI_API_KEY"},
        )
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.process.returncode}:\n{self.tail()}"
                )
            if http_status(self.base + self.ready_path) == 200:
                self.ready_s = time.monotonic() - started
                print(f"  {self.name} ready in {self.ready_s:.1f} s at {self.base}")
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(ValueError):
            self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.peak_rss_mb = peak_rss_mb(self.process.pid)
        self.log.close()
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def running(
    make: Callable[[int], Server], timeout: float, warm_start: bool = True
) -> Iterator[str]:
    """A server from `make(port)`, stopped on the way out; yields its base URL.

    With `warm_start` it is first started once and stopped, so the start that is timed and
    measured finds the model file in the page cache and any on-disk cache the server keeps
    (compiled kernels) filled, as every start after the first one on a machine does.
    """
    first_s = None
    if warm_start:
        first = make(free_port())
        try:
            first.start(timeout)
        finally:
            first.stop()
        first_s = first.ready_s
        print(f"  {first.name}: stopped; starting it again for the warm start and the run")
    server = make(free_port())
    try:
        server.start(timeout)
        yield server.base
    finally:
        server.stop()
        if server.peak_rss_mb is not None:
            print(f"  {server.name}: peak RSS {server.peak_rss_mb:.0f} MB")
        SERVERS[server.name] = {
            "first_start_s": first_s,
            "ready_s": server.ready_s,
            "peak_rss_mb": server.peak_rss_mb,
        }


# Per peer: start-up times (first start, the timed warm start) and the peak RSS of the run.
SERVERS: dict[str, dict[str, float | None]] = {}


def sorai_command(args: argparse.Namespace, port: int) -> list[str]:
    script = Path(sys.executable).with_name("sorai")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sorai.cli"]
    command += ["serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port)]
    if args.dtype:
        command += ["--dtype", args.dtype]
    return command + shlex.split(args.sorai_args)


# llama-server as in the reference run: 16 slots sharing an 8192-token context.
LLAMA_SERVER_SLOTS = 16
LLAMA_SERVER_CTX = 8192
LLAMA_SERVER_SLOT_CTX = LLAMA_SERVER_CTX // LLAMA_SERVER_SLOTS
MAX_PROMPT_TOKENS = 320  # build_prompts' longest chat prompt, with the template, is ~300


def llama_server_command(server: Path, gguf: Path, port: int, threads: int) -> list[str]:
    """`llama-server -m GGUF -np 16 -c 8192 -t THREADS` on loopback (threads 0: every core)."""
    command = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    command += ["-np", str(LLAMA_SERVER_SLOTS), "-c", str(LLAMA_SERVER_CTX), "--no-webui"]
    return command + ["-t", str(threads or cores())]


LLAMA_CPP_VERSION = ["not run"]  # the llama.cpp build measured, for the report


async def build_info(base: str) -> str:
    """A running llama-server's own build ("b1234-abcdef0"), from its /props."""
    with contextlib.suppress(OSError, HTTPError, ValueError, KeyError, TypeError):
        status, data = await get_json(base + "/props")
        if status == 200 and data.get("build_info"):
            return f"{data['build_info']} (a running server at {base})"
    return f"unknown (a running server at {base})"


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM) in MB (10^6 bytes), while it still runs."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6  # the kernel's "kB" are KiB
    return None


# ----------------------------------------------------------------------------------------------
# transformers: single-stream decode tokens/s in float32


def bench_transformers(path: Path, args: argparse.Namespace) -> float:
    """Decode tok/s of transformers `generate`, fp32, greedy, on the median-length prompt.

    (N - 1) / (median time(N new tokens) - median time(1 new token)) over `--rounds`, with
    N = `--decode-tokens`, as in bench_generate.py: prefill and start-up cost cancel out.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion progress bar
    import torch
    from transformers.utils import logging as transformers_logging

    from sorai.model.gguf import GGUFFile
    from sorai.model.tokenizer import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_generate import load_reference, time_reference

    transformers_logging.disable_progress_bar()
    if path.is_dir():
        tokenizer = Tokenizer.from_dir(path)
    else:
        tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    prompts = [tokenizer.encode_chat(p) for p in build_prompts(64, args.seed)]
    ids = sorted(prompts, key=len)[len(prompts) // 2]
    ref = load_reference(path, torch.float32)
    n = args.decode_tokens
    print(f"  transformers: prompt {len(ids)} tokens, {n} new tokens, float32", flush=True)
    time_reference(ref, ids, 8)  # warm-up
    short, long = [], []
    for _ in range(args.rounds):
        short.append(time_reference(ref, ids, 1))
        long.append(time_reference(ref, ids, n))
    spent = statistics.median(long) - statistics.median(short)
    rate = (n - 1) / spent if spent > 0 else float("nan")
    print(f"  transformers: {rate:.1f} tok/s decode ({args.rounds} rounds)", flush=True)
    return rate


# ----------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"  # NaN -> "-"


def print_table(summaries: list[LevelSummary]) -> None:
    header = (
        f"{'peer':12s} {'conc':>4s} {'reqs':>7s} {'out tok':>7s} {'tok/s':>7s} "
        f"{'TTFT mean':>9s} {'p50':>6s} {'p99':>6s} {'TPOT ms':>7s} {'ITL ms':>6s} "
        f"{'e2e s':>6s} {'prompt':>6s}"
    )
    print(header)
    print("-" * len(header))
    for s in summaries:
        reqs = f"{s.completed}/{s.sent}"
        print(
            f"{s.peer:12s} {s.concurrency:4d} {reqs:>7s} {s.output_tokens:7d} "
            f"{fmt(s.output_tok_s, 1):>7s} {fmt(s.ttft_mean):>9s} {fmt(s.ttft_p50):>6s} "
            f"{fmt(s.ttft_p99):>6s} {fmt(s.tpot_mean * 1000, 1):>7s} "
            f"{fmt(s.itl_mean * 1000, 1):>6s} {fmt(s.e2e_mean, 2):>6s} "
            f"{fmt(s.mean_prompt_tokens, 0):>6s}"
        )


def goal_line(name: str, value: float | None, target: str, met: bool | None) -> str:
    verdict = "n/a (not measured)" if met is None else ("MET" if met else "NOT MET")
    shown = "-" if value is None else f"{value:.2f}"
    return f"  {name:58s} {shown:>6s}  goal {target:8s} {verdict}"


def report(
    summaries: list[LevelSummary],
    transformers_tok_s: float | None,
    levels: Sequence[int],
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Prints the table, the ratios and the goals; returns them all for `--json`.

    `max_tokens` is each answer's expected length where ignore_eos was sent."""
    by = {(s.peer, s.concurrency): s for s in summaries}
    print()
    print(f"CPU: {cpu_flags()}")
    print(f"load average now {load_average()}; llama.cpp {LLAMA_CPP_VERSION[0]}")
    if warning := busy_warning():
        print(warning)
    print_table(summaries)
    if max_tokens is not None:
        for peer in dict.fromkeys(s.peer for s in summaries):
            wrong = sum(s.wrong_length for s in summaries if s.peer == peer)
            done = sum(s.completed for s in summaries if s.peer == peer)
            verdict = "yes" if not wrong else f"NO: {wrong}/{done} answers of another length"
            print(f"  {peer}: every answer {max_tokens} tokens (ignore_eos): {verdict}")
    print()
    print(f"sorai / {LLAMA_CPP}:")
    ratios: dict[str, dict[str, float]] = {}
    for c in levels:
        ours, theirs = by.get((SORAI, c)), by.get((LLAMA_CPP, c))
        if ours and theirs and theirs.output_tok_s > 0:
            ratios[str(c)] = {
                "tok_s": ours.output_tok_s / theirs.output_tok_s,
                "ttft": ours.ttft_mean / theirs.ttft_mean if theirs.ttft_mean else float("nan"),
                "decode": ours.decode_tok_s / theirs.decode_tok_s,
            }
            r = ratios[str(c)]
            print(
                f"  concurrency {c:3d}: output tok/s {ours.output_tok_s:6.1f} / "
                f"{theirs.output_tok_s:6.1f} = {r['tok_s']:.2f}x; mean TTFT {ours.ttft_mean:.2f} "
                f"/ {theirs.ttft_mean:.2f} s = {r['ttft']:.2f}x; decode {ours.decode_tok_s:.1f} / "
                f"{theirs.decode_tok_s:.1f} tok/s = {r['decode']:.2f}x"
            )
    if not ratios:
        print("  n/a (both peers are needed)")
    for name, facts in SERVERS.items():
        rss, ready, first = facts["peak_rss_mb"], facts["ready_s"], facts["first_start_s"]
        if first is not None:
            starts = f"first start {fmt(first, 1)} s, warm start {fmt(ready, 1)} s"
        else:  # --single-start: perhaps a cold page cache or compile cache
            starts = f"start (the only one) {fmt(ready, 1)} s"
        print(f"  {name}: {starts} (spawn -> healthy), peak RSS {fmt(rss, 0)} MB")
    if transformers_tok_s:
        print(f"  transformers float32 single-stream decode: {transformers_tok_s:.1f} tok/s")
    at16, at1 = ratios.get(str(GOAL_CONCURRENCY), {}), ratios.get("1", {})
    ours_server = SERVERS.get(SORAI, {})
    rss, ready = ours_server.get("peak_rss_mb"), ours_server.get("ready_s")
    c16 = GOAL_CONCURRENCY
    goals = {  # name: (what it is, value, comparison, target)
        "tok_s_ratio_c16": (
            f"c{c16} output tok/s, sorai / {LLAMA_CPP}",
            at16.get("tok_s"), ">=", GOAL_THROUGHPUT_RATIO,
        ),
        "ttft_ratio_c16": (
            f"c{c16} mean TTFT, sorai / {LLAMA_CPP}", at16.get("ttft"), "<=", GOAL_TTFT_RATIO
        ),
        "decode_ratio_c1": (
            f"c1 decode tok/s (1/TPOT), sorai / {LLAMA_CPP}",
            at1.get("decode"), ">=", GOAL_DECODE_RATIO,
        ),
        "sorai_peak_rss_mb": ("sorai serve peak RSS (MB)", rss, "<=", GOAL_RSS_MB),
        "sorai_ready_s": ("sorai serve warm start to healthy (s)", ready, "<=", GOAL_READY_S),
    }  # fmt: skip
    print()
    print("Goals:")
    verdicts = {}
    for name, (what, value, op, target) in goals.items():
        met = (
            None
            if value is None or value != value
            else (value >= target if op == ">=" else value <= target)
        )
        verdicts[name] = {"value": value, "goal": f"{op} {target:g}", "met": met}
        print(goal_line(what, value, f"{op} {target:.3g}", met))
    return {
        "cpu": cpu_flags(),
        "load_average": os.getloadavg(),
        "llama_cpp_version": LLAMA_CPP_VERSION[0],
        "levels": [dataclasses.asdict(s) for s in summaries],
        "servers": SERVERS,
        "transformers_fp32_decode_tok_s": transformers_tok_s,
        "sorai_over_llama_server": ratios,
        "goals": verdicts,
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


def cpu_flags() -> str:
    from sorai.model.hardware import machine

    return machine().describe()


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--dtype", default=None, help="passed to `sorai serve --dtype`")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument(
        "--requests", type=int, default=32, help="requests per level (default: %(default)s)"
    )
    parser.add_argument(
        "--level-time",
        type=float,
        default=600.0,
        help="seconds per level at most (32 x 64 tokens at 15 tok/s take ~140 s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt set")
    parser.add_argument("--peers", default=f"{SORAI},{LLAMA_CPP}")
    parser.add_argument(
        "--sorai-args", default="", help='more `sorai serve` flags, e.g. "--cpu-threads 2"'
    )
    parser.add_argument("--sorai-url", default=None, help="use this running sorai server")
    parser.add_argument("--llama-cpp-url", default=None, help="use this running llama.cpp server")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama-server")
    parser.add_argument(
        "--llama-cpp-threads", type=int, default=0, help="llama-server -t (default: every core)"
    )
    parser.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let answers end at EOS (default: every answer is --max-tokens long)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="transformers timing rounds")
    parser.add_argument(
        "--decode-tokens", type=int, default=128, help="transformers: new tokens per round"
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument(
        "--single-start",
        action="store_true",
        help="start each server once (default: start, stop, and time the second, warm start)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(ALL_PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {','.join(ALL_PEERS)}")
    if args.sorai_url:
        args.sorai_url = check_loopback(args.sorai_url)
    if args.llama_cpp_url:
        args.llama_cpp_url = check_loopback(args.llama_cpp_url)
    if args.no_llama_cpp and LLAMA_CPP in args.peers:
        args.peers.remove(LLAMA_CPP)
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM and SIGHUP end the run like Ctrl-C does: the servers are stopped on the way out.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    path = hub.resolve(args.model, progress=print)
    print(
        f"model {args.model} ({path}), max_tokens {args.max_tokens}, temperature 0, "
        f"ignore_eos {args.ignore_eos}, concurrency {args.concurrency}, {args.requests} requests "
        f"a level, peers {','.join(args.peers)}"
    )
    print(f"CPU: {cpu_flags()}")
    print(f"load average {load_average()} (other work on the machine skews the results)")
    if warning := busy_warning():
        print(warning)
    if LLAMA_CPP in args.peers and args.max_tokens + MAX_PROMPT_TOKENS > LLAMA_SERVER_SLOT_CTX:
        print(
            f"  note: llama-server's slots hold {LLAMA_SERVER_SLOT_CTX} tokens each (-c "
            f"{LLAMA_SERVER_CTX} over -np {LLAMA_SERVER_SLOTS}): prompts up to "
            f"{MAX_PROMPT_TOKENS} tokens plus {args.max_tokens} may not fit"
        )
    summaries: list[LevelSummary] = []
    transformers_tok_s = None
    try:
        if SORAI in args.peers:
            print(f"{SORAI}:")
            try:
                if args.sorai_url:
                    asyncio.run(bench_server(SORAI, args.sorai_url, args, summaries))
                else:

                    def sorai_server(port: int) -> Server:
                        base = f"http://127.0.0.1:{port}"
                        return Server(SORAI, sorai_command(args, port), base, "/health")

                    warm = not args.single_start
                    with running(sorai_server, args.startup_timeout, warm) as base:
                        asyncio.run(bench_server(SORAI, base, args, summaries))
            except (RuntimeError, HTTPError, OSError) as exc:
                print(f"  {SORAI}: skipped: {exc}")
        if LLAMA_CPP in args.peers:
            print(f"{LLAMA_CPP}:")
            try:
                if args.llama_cpp_url:
                    LLAMA_CPP_VERSION[0] = asyncio.run(build_info(args.llama_cpp_url))
                    print(f"  llama.cpp {LLAMA_CPP_VERSION[0]}")
                    asyncio.run(bench_server(LLAMA_CPP, args.llama_cpp_url, args, summaries))
                elif path.suffix != ".gguf":
                    print(f"  {LLAMA_CPP}: skipped: {path} is not a GGUF file")
                else:
                    built = ensure_llama_cpp()
                    LLAMA_CPP_VERSION[0] = built.version
                    print(f"  llama.cpp {built.version}")

                    def llama_server(port: int) -> Server:
                        command = llama_server_command(
                            built.server, path, port, args.llama_cpp_threads
                        )
                        return Server(LLAMA_CPP, command, f"http://127.0.0.1:{port}", "/health")

                    warm = not args.single_start
                    with running(llama_server, args.startup_timeout, warm) as base:
                        asyncio.run(bench_server(LLAMA_CPP, base, args, summaries))
            except (RuntimeError, HTTPError, OSError) as exc:
                print(f"  {LLAMA_CPP}: skipped: {exc}")
        if TRANSFORMERS in args.peers:
            print("transformers:")
            transformers_tok_s = bench_transformers(path, args)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped; results so far:")
    expected = args.max_tokens if args.ignore_eos else None
    results = report(summaries, transformers_tok_s, args.concurrency, expected)
    if args.json:
        args.json.write_text(json.dumps(without_nan(results), indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
