"""Where `sorai serve`'s memory goes: RSS (anonymous and file-backed) after each stage of its
start and of a serving workload.

    python benchmarks/bench_memory.py [--model M] [--concurrency 16] [--requests 32]
        [--max-tokens 64] [--idle 5] [--no-guided] [--no-embeddings] [--sorai-args "..."]
        [--json out.json]

The server runs in a child process (this script with `--child`), which is `sorai serve` itself
(`sorai.cli.main(["serve", ...])`) with a record taken at each stage of its start: the bare
interpreter, `import torch`, `import sorai.cli` (every verb's parser), the server stack's
imports, the model loaded (`load_pretrained` returns), the engine built (KV cache, fused
projections, grammar compiler), the app created, the socket listening. Then this process drives
it over HTTP as bench_serving.py does (the same prompts, greedy, `ignore_eos`, streamed) and has
the child take a record (SIGUSR1) after: healthy, one request, one guided request (a JSON
schema), each concurrency level (`--concurrency`, `--requests` each), one /v1/embeddings request
(the embedding model loads on first use), and `--idle` seconds of idle.

Each record: RSS, its anonymous and file-backed parts (/proc/self/smaps_rollup, MB = 10^6
bytes), the peak so far (VmHWM), the threads, and which heavy modules the process has imported
(transformers, sentence_transformers, ...). The report prints the machine, the load average,
the table with each stage's growth, the KV cache's size from the banner, and the peak against
the goal (800 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GOAL_RSS_MB = 800.0  # sorai serve's peak RSS on the serving workload (bench_serving.py)
HEAVY_MODULES = (
    "transformers",
    "sentence_transformers",
    "openai",
    "peft",
    "datasets",
    "accelerate",
    "scipy",
    "sklearn",
    "pandas",
    "PIL",
    "gguf",
    "xgrammar",
    "outlines",
)


# ----------------------------------------------------------------------------------------------
# The child: `sorai serve` with a record per stage


def memory_record(stage: str) -> dict[str, Any]:
    """This process's memory now (MB = 10^6 bytes), from /proc/self."""
    kib: dict[str, int] = {}
    for path in ("/proc/self/status", "/proc/self/smaps_rollup"):
        try:
            for line in Path(path).read_text().splitlines():
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    kib.setdefault(name, int(parts[0]))
        except OSError:
            pass

    def mb(name: str) -> float | None:
        return kib[name] * 1024 / 1e6 if name in kib else None

    return {
        "stage": stage,
        "time": time.monotonic(),
        "rss_mb": mb("VmRSS"),
        "anon_mb": mb("RssAnon"),
        "file_mb": mb("RssFile"),
        "shmem_mb": mb("RssShmem"),  # the KV cache: a shared anonymous mapping
        "hwm_mb": mb("VmHWM"),
        "threads": int(Path("/proc/self/status").read_text().split("Threads:")[1].split()[0]),
        "modules": [m for m in HEAVY_MODULES if m in sys.modules],
    }


def child(records: str, serve_args: list[str]) -> int:
    """Run `sorai serve serve_args`, appending a JSON record per stage to `records`."""

    def record(stage: str) -> None:
        with open(records, "a") as f:
            f.write(json.dumps(memory_record(stage)) + "\n")

    record("interpreter")
    # The parent names the stage it asks for; the handler runs between the loop's callbacks.
    signal.signal(signal.SIGUSR1, lambda *_: record("signal"))
    import torch  # noqa: F401 - the stage measured

    record("import torch")
    import sorai.cli

    record("import sorai.cli (every verb's parser)")
    import sorai.engine.async_engine
    import sorai.engine.llm_engine as llm_engine
    import sorai.server.serve as serve_module

    record("server stack imports")

    def after(owner: Any, name: str, stage: str) -> None:
        """owner.name records `stage` each time it returns."""
        inner = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            record(stage)
            return out

        setattr(owner, name, wrapped)

    after(llm_engine, "load_pretrained", "model loaded")
    after(llm_engine.LLMEngine, "__init__", "engine built (KV cache, grammar compiler)")
    after(serve_module, "create_app", "app created")
    startup = serve_module._Server.startup

    async def starting(self: Any, *args: Any, **kwargs: Any) -> None:
        await startup(self, *args, **kwargs)
        record("listening")

    serve_module._Server.startup = starting  # type: ignore[method-assign]
    return sorai.cli.main(["serve", *serve_args])


# ----------------------------------------------------------------------------------------------
# The parent: start the child, drive it, read its records


class Child:
    """The child server process and its record file."""

    def __init__(self, serve_args: list[str]) -> None:
        self.records = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives with the child
            prefix="bench-memory-", suffix=".jsonl", delete=False
        ).name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="bench-memory-", suffix=".log", delete=False
        )
        command = [sys.executable, __file__, "--child", self.records, "--", *serve_args]
        print(f"  starting: {shlex.join(command)}  (log {self.log.name})", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "SORAI_API_KEY"}
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.named: list[str] = []  # the stage names of the parent's SIGUSR1 records

    def read(self) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in Path(self.records).read_text().splitlines()]
        names = iter(self.named)
        for row in rows:
            if row["stage"] == "signal":
                row["stage"] = next(names, "signal")
        return rows

    def mark(self, stage: str, timeout: float = 30.0) -> dict[str, Any]:
        """Have the child take a record now, named `stage`."""
        before = len(self.read())
        self.named.append(stage)
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.read()
            if len(rows) > before:
                return rows[-1]
            time.sleep(0.05)
        raise RuntimeError(f"the server took no record for {stage!r} in {timeout:.0f} s")

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def wait_healthy(server: Child, base: str, timeout: float) -> float:
    from bench_serving import http_status

    while time.monotonic() - server.started < timeout:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited ({server.process.returncode}):\n{server.tail()}")
        if http_status(base + "/health") == 200:
            return time.monotonic() - server.started
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy after {timeout:.0f} s:\n{server.tail()}")


async def post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    from bench_serving import _body, _request

    status, reader, writer, headers = await _request(url, "POST", body)
    try:
        data = b"".join([chunk async for chunk in _body(reader, headers)])
    finally:
        writer.close()
    return status, json.loads(data)


GUIDED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Tokyo", "Lima"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


async def drive(server: Child, base: str, args: argparse.Namespace) -> None:
    """The workload, a record after each part."""
    from bench_serving import (
        RequestResult,
        build_prompts,
        model_id_of,
        request_body,
        run_level,
        stream_chat,
    )

    model_id = await model_id_of(base, args.model)
    prompts = build_prompts(1 + args.requests * len(args.concurrency), args.seed)
    bodies = [request_body(model_id, p, args.max_tokens, True) for p in prompts]
    warm = RequestResult(index=-1)
    await stream_chat(base, bodies[0], warm)
    if not warm.ok:
        raise RuntimeError(f"the first request failed: {warm.error}")
    server.mark("after 1 request")
    if args.guided:
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": "A person as JSON."}],
            "max_tokens": 48,
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": GUIDED_SCHEMA},
            },
        }
        status, data = await post_json(base + "/v1/chat/completions", body)
        if status != 200:
            raise RuntimeError(f"the guided request failed: HTTP {status} {data}")
        server.mark("after a guided request (JSON schema)")
    offset = 1
    for concurrency in args.concurrency:
        level = bodies[offset : offset + args.requests]
        offset += args.requests
        results, wall = await run_level(base, level, concurrency, time_limit=3600)
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
        tokens = sum(r.output_tokens for r in results)
        print(f"  concurrency {concurrency}: {tokens / wall:.1f} output tok/s", flush=True)
        server.mark(f"after {len(level)} requests, {concurrency} concurrent")
    if args.embeddings:
        body = {"model": args.embedding_model, "input": ["memory of a server", "a quick start"]}
        status, data = await post_json(base + "/v1/embeddings", body)
        if status != 200:
            raise RuntimeError(f"the embeddings request failed: HTTP {status} {data}")
        server.mark("after an embeddings request (model loaded)")
    await asyncio.sleep(args.idle)
    server.mark(f"after {args.idle:g} s idle")


def banner_line(log: str, prefix: str) -> str | None:
    for line in log.splitlines():
        if line.startswith(prefix):
            return line
    return None


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(rows: list[dict[str, Any]], log: str, ready_s: float, args: argparse.Namespace) -> dict:
    from sorai.model.hardware import machine

    print()
    print(f"machine: {machine().describe()}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    print(f"server: sorai serve --model {args.model} {args.sorai_args}".rstrip())
    for prefix in ("running ", "kv cache", "KV cache"):
        if line := banner_line(log, prefix):
            print(f"banner: {line}")
    print(f"spawn -> healthy: {ready_s:.1f} s")
    print()
    header = f"{'stage':<44} {'RSS':>6} {'+':>6} {'anon':>6} {'file':>6} {'shmem':>6} {'peak':>6}"
    header += f" {'thr':>4}"
    print(header + "  (MB)")
    print("-" * len(header))
    previous = None
    for row in rows:
        grew = None if previous is None else row["rss_mb"] - previous
        previous = row["rss_mb"]
        print(
            f"{row['stage'][:44]:<44} {fmt(row['rss_mb']):>6} {fmt(grew):>6} "
            f"{fmt(row['anon_mb']):>6} {fmt(row['file_mb']):>6} {fmt(row['shmem_mb']):>6} "
            f"{fmt(row['hwm_mb']):>6} "
            f"{row['threads']:>4}"
        )
    peak = max(row["hwm_mb"] or 0 for row in rows)
    modules = rows[-1]["modules"]
    print()
    print(f"heavy modules imported by the server: {', '.join(modules) or 'none'}")
    met = "met" if peak <= GOAL_RSS_MB else "NOT met"
    print(f"peak RSS {peak:.0f} MB (goal <= {GOAL_RSS_MB:.0f} MB: {met})")
    return {"rows": rows, "peak_rss_mb": peak, "ready_s": ready_s, "machine": machine().describe()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from sorai import hub

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[16],
        help="levels run one after another, comma-separated (bench_serving's: 1,4,16)",
    )
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle at the end")
    parser.add_argument("--no-guided", dest="guided", action="store_false")
    parser.add_argument("--no-embeddings", dest="embeddings", action="store_false")
    parser.add_argument("--embedding-model", default=hub.DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--sorai-args", default="", help="more `sorai serve` flags, verbatim")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to get healthy")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # the server: --child RECORDS -- SERVE ARGS
        return child(argv[1], argv[3:])
    args = parse_args(argv)
    from bench_serving import free_port

    port = free_port()
    serve_args = ["--model", args.model, "--host", "127.0.0.1", "--port", str(port)]
    serve_args += shlex.split(args.sorai_args)
    base = f"http://127.0.0.1:{port}"
    server = Child(serve_args)
    try:
        ready_s = wait_healthy(server, base, args.timeout)
        server.mark("healthy")
        asyncio.run(drive(server, base, args))
        rows = server.read()
        log = server.tail(200)
    finally:
        server.stop()
    result = report(rows, log, ready_s, args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
