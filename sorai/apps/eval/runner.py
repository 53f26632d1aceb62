"""Running an evaluation: generate responses with a target (optional), score every row with
every evaluator, concurrently (bounded), retrying 429/5xx with exponential backoff, caching each
finished result in the run directory so an interrupted run resumes where it stopped, and
recording a row's errors in its result instead of aborting the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sorai.apps.eval.data import EvalRow, as_text
from sorai.apps.eval.registry import Context, Evaluator, Score
from sorai.errors import SoraiError

CACHE = "cache.jsonl"


def status_of(error: BaseException) -> int | None:
    """The HTTP status of a failed request: sorai's ClientError keeps it as `status`, the
    openai client's errors as `status_code`."""
    for name in ("status", "status_code"):
        status = getattr(error, name, None)
        if isinstance(status, int):
            return status
    return None


def retryable(error: BaseException) -> bool:
    status = status_of(error)
    return status is not None and (status == 429 or status >= 500)


@dataclass
class Retry:
    """Attempts after the first, and the backoff: `backoff * 2**attempt` seconds. `sleep` is
    injectable so that tests do not wait."""

    retries: int = 4
    backoff: float = 1.0
    sleep: Callable[[float], None] = time.sleep

    def call(self, work: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return work()
            except Exception as e:
                if attempt == self.retries or not retryable(e):
                    raise
                self.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")


class Cache:
    """Finished results, one JSON line each, appended as they finish (so a killed run loses at
    most the results in flight). A torn last line from a kill is ignored."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, Any] = {}
        self._lock = threading.Lock()
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = entry["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        self._file = path.open("a", encoding="utf-8")
        if text and not text.endswith("\n"):
            # A kill tore the last line: end it, or the next result would be appended to the
            # torn text and lost with it at the next resume.
            self._file.write("\n")
            self._file.flush()

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self.entries[key] = value
            self._file.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def cache_key(*parts: Any) -> str:
    text = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Generation:
    response: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Target:
    """What produces `response` for a row: a model on an endpoint, or a skill."""

    name: str = "target"

    @property
    def settings(self) -> tuple:
        """What, besides the row, shapes a response: the generation cache keys on it."""
        return (self.name,)

    def generate(self, row: EvalRow) -> Generation:
        raise NotImplementedError


def _usage(response: Any) -> tuple[int, int]:
    usage = getattr(response, "usage", None)
    return (
        int(getattr(usage, "prompt_tokens", 0) or 0),
        int(getattr(usage, "completion_tokens", 0) or 0),
    )


@dataclass
class ModelTarget(Target):
    """A chat model: the row's query (after its context, when it has one) as the user turn."""

    client: Any
    model: str
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"model:{self.model}"

    @property
    def settings(self) -> tuple:
        return (self.name, self.system, self.max_tokens, self.temperature)

    def generate(self, row: EvalRow) -> Generation:
        query = as_text(row.fields.get("query"))
        context = as_text(row.fields.get("context"))
        content = f"Context:\n{context}\n\nQuestion: {query}" if context else query
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": content}
        ]
        start = time.perf_counter()
        response = self.client.chat(
            messages, model=self.model, max_tokens=self.max_tokens, temperature=self.temperature
        )
        latency = time.perf_counter() - start
        text = response.choices[0].message.content or ""
        return Generation(text.strip(), latency, *_usage(response))


SKILLS = ("summarize", "sentiment")


@dataclass
class SkillTarget(Target):
    """A skill applied to the row's query: summarize (the summary) or sentiment (the label)."""

    client: Any
    skill: str

    def __post_init__(self) -> None:
        if self.skill not in SKILLS:
            raise SoraiError(f"--target skill:{self.skill}: skills: {', '.join(SKILLS)}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"skill:{self.skill}"

    def generate(self, row: EvalRow) -> Generation:
        text = as_text(row.fields.get("query"))
        start = time.perf_counter()
        if self.skill == "summarize":
            from sorai.apps.skills.summarize import summarize

            answer = summarize(self.client, text).text
        else:
            from sorai.apps.skills.sentiment import sentiment

            answer = sentiment(self.client, text).label
        # Skills make their own calls; their token usage is not reported to us.
        return Generation(answer, time.perf_counter() - start)


class Progress:
    """A one-line progress bar on stderr (a line per tenth when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()
        self._lock = threading.Lock()
        self._last_tenth = -1

    def step(self, errors: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += 1
            bar = "#" * (30 * self.done // self.total)
            line = f"[{bar:<30}] {self.done}/{self.total} rows" + (
                f", {errors} with errors" if errors else ""
            )
            if self.tty:
                end = "\n" if self.done == self.total else ""
                print(f"\r{line}", end=end, file=sys.stderr, flush=True)
            elif (tenth := 10 * self.done // self.total) != self._last_tenth:
                self._last_tenth = tenth
                print(line, file=sys.stderr, flush=True)


def _endpoint(client: Any, model_attribute: str, name: str | None = None) -> str:
    openai = getattr(client, "openai", None)
    url = name or (str(openai.base_url) if openai is not None else type(client).__name__)
    return f"{url}|{getattr(client, model_attribute, '')}"


@dataclass
class Runner:
    evaluators: list[Evaluator]
    context: Context
    run_dir: Path
    target: Target | None = None
    concurrency: int = 4
    retry: Retry = field(default_factory=Retry)
    thresholds: dict[str, float | None] = field(default_factory=dict)
    progress: bool = True
    cached: int = field(default=0, init=False)  # results read back from the cache
    _counting: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _errors: int = field(default=0, init=False)

    def threshold(self, evaluator: Evaluator) -> float | None:
        return self.thresholds.get(evaluator.name, evaluator.threshold)

    def _judge_id(self, evaluator: Evaluator) -> str:
        """Who scored: another judge model (or endpoint) is judged afresh, not read back."""
        if evaluator.name == "embedding_similarity":
            return _endpoint(self.context.embedder, "embedding_model", self.context.endpoint)
        if evaluator.uses_judge:
            return _endpoint(self.context.judge, "model", self.context.endpoint)
        return ""

    def run(self, rows: list[EvalRow]) -> list[dict[str, Any]]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cache = Cache(self.run_dir / CACHE)
        digests = {e.name: e.digest(self.context) for e in self.evaluators}
        judges = {e.name: self._judge_id(e) for e in self.evaluators}
        progress = Progress(len(rows), self.progress)
        results: list[dict[str, Any] | None] = [None] * len(rows)
        lock = threading.Lock()

        stop = threading.Event()

        def one(position: int, row: EvalRow) -> None:
            # After a fatal error (or a kill) no new row starts: queued rows would otherwise
            # keep a worker busy until the pool drains.
            if stop.is_set():
                return
            try:
                result = self._row(row, cache, digests, judges)
            except BaseException:
                stop.set()
                raise
            with lock:
                results[position] = result
                if any(k == "error" or k.endswith("_error") for k in result):
                    self._errors += 1
            progress.step(self._errors)

        try:
            with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
                futures = [pool.submit(one, i, row) for i, row in enumerate(rows)]
                try:
                    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
                except BaseException:
                    # Ctrl-C arrives here, in the main thread: without this the pool's exit
                    # would wait for every queued row to be judged.
                    stop.set()
                    for future in futures:
                        future.cancel()
                    raise
                for future in pending:
                    future.cancel()
                for future in done:
                    future.result()  # re-raises what stopped the run (fatal, or a kill)
        finally:
            cache.close()
        return [r for r in results if r is not None]

    def _row(
        self, row: EvalRow, cache: Cache, digests: dict[str, str], judges: dict[str, str]
    ) -> dict[str, Any]:
        result: dict[str, Any] = {"index": row.index, "where": row.where}
        result.update({k: v for k, v in row.fields.items()})
        if row.error:
            result["error"] = f"{row.where}: {row.error}"
            return result
        if self.target is not None:
            key = cache_key(
                "generate", self.target.settings, row.fields.get("query"), row.fields.get("context")
            )
            generation = cache.get(key)
            if generation is not None:
                self._count_cached()
            else:
                try:
                    made = self.retry.call(lambda: self.target.generate(row))
                except Exception as e:
                    self._fatal(e)
                    result["error"] = f"{row.where}: {self.target.name}: {e}"
                    return result
                generation = {
                    "response": made.response,
                    "latency_s": made.latency_s,
                    "prompt_tokens": made.prompt_tokens,
                    "completion_tokens": made.completion_tokens,
                }
                cache.put(key, generation)
            row = EvalRow(
                row.index,
                row.where,
                {**row.fields, "response": generation["response"]},
                {**row.extra, "_generation": generation},
            )
            result["response"] = generation["response"]
        for evaluator in self.evaluators:
            result.update(self._score(evaluator, row, cache, digests, judges))
        return result

    def _score(
        self,
        evaluator: Evaluator,
        row: EvalRow,
        cache: Cache,
        digests: dict[str, str],
        judges: dict[str, str],
    ) -> dict[str, Any]:
        name = evaluator.name
        missing = [f for f in evaluator.needs if not row.has(f)]
        if missing:
            return {f"{name}_error": f"{row.where}: no {' or '.join(missing)} (needed by {name})"}
        key = cache_key(
            "score",
            name,
            digests[name],
            judges[name],
            {k: row.fields.get(k) for k in ("query", "context", "response", "ground_truth")},
            row.extra.get("_generation") if evaluator.kind == "usage" else None,
            # Custom functions see the row's other columns too.
            {k: v for k, v in row.extra.items() if k != "_generation"},
        )
        stored = cache.get(key)
        if stored is not None:
            self._count_cached()
            score = Score(stored["value"], stored.get("reason"), stored.get("extra", {}))
        else:
            try:
                score = self.retry.call(lambda: evaluator.run(row, self.context))
                if score.value is not None and not math.isfinite(score.value):
                    # NaN would poison the mean, the report and compare's intervals.
                    raise SoraiError(f"the score is {score.value}, not a finite number")
            except Exception as e:
                self._fatal(e)
                return {f"{name}_error": f"{row.where}: {name}: {e}"}
            cache.put(key, {"value": score.value, "reason": score.reason, "extra": score.extra})
        out: dict[str, Any] = {name: score.value}
        if score.reason is not None:
            out[f"{name}_reason"] = score.reason
        for k, v in score.extra.items():
            out[f"{name}_{k}"] = v
        threshold = self.threshold(evaluator)
        if threshold is not None and score.value is not None:
            passed = (
                score.value >= threshold if evaluator.higher_is_better else score.value <= threshold
            )
            out[f"{name}_result"] = "pass" if passed else "fail"
        return out

    def _count_cached(self) -> None:
        with self._counting:  # `+=` from several worker threads can lose counts
            self.cached += 1

    @staticmethod
    def _fatal(error: Exception) -> None:
        """An endpoint that cannot be reached, refuses the key (401, 403) or does not serve
        the model (404) fails every row alike: stop (what finished is cached, so the run
        resumes) rather than fill the table with the same error."""
        from sorai.apps.client import FATAL_STATUSES, ClientError

        if isinstance(error, ClientError) and error.fatal:
            raise error
        if status_of(error) in FATAL_STATUSES:  # the openai client's own errors
            raise error
