"""Running: retries with backoff on 429/5xx, errors kept per row, and resume after a kill."""

from __future__ import annotations

import json

import pytest

from sorai.apps.client import ClientError
from sorai.apps.eval.data import load_rows
from sorai.apps.eval.registry import Context, resolve
from sorai.apps.eval.runner import CACHE, Retry, Runner, retryable

from .conftest import write_jsonl
from .doubles import NumberJudge, warranty_rows


class Killed(BaseException):
    """Stands for the process being killed mid-run: not an Exception, so no row catches it."""


def runner(tmp_path, judge, metrics=("groundedness",), sleeps=None, **kw) -> Runner:
    sleep = sleeps.append if sleeps is not None else lambda s: None
    return Runner(
        resolve(list(metrics)),
        Context(judge, judge),
        tmp_path / "run",
        retry=Retry(retries=kw.pop("retries", 4), backoff=1.0, sleep=sleep),
        progress=False,
        **kw,
    )


def test_retryable_statuses():
    assert retryable(ClientError("chat request refused (429): slow down", 429))
    assert retryable(ClientError("chat request refused (503): overloaded", 503))
    assert not retryable(ClientError("chat request refused (400): bad schema", 400))
    assert not retryable(ValueError("no status"))


def test_retries_back_off_exponentially_then_succeed(tmp_path):
    def fail(call, response):
        return ClientError("chat request refused (429): busy", 429) if call <= 3 else None

    sleeps: list[float] = []
    data = write_jsonl(tmp_path / "d.jsonl", warranty_rows(90)[:1])
    (result,) = runner(tmp_path, NumberJudge(fail), sleeps=sleeps).run(load_rows(str(data)))
    assert sleeps == [1.0, 2.0, 4.0]
    assert result["groundedness_result"] == "pass"


def test_errors_stay_in_their_row_and_the_run_goes_on(tmp_path):
    rows = warranty_rows(90)[:3]
    rows[1] = {**rows[1], "response": "BAD"}
    del rows[2]["context"]
    data = tmp_path / "d.jsonl"
    write_jsonl(data, rows)
    with data.open("a") as f:
        f.write("{not json\n")

    def fail(call, response):
        if response == "BAD":
            return ClientError("chat request refused (500): the judge crashed", 500)
        return None

    sleeps: list[float] = []
    results = runner(tmp_path, NumberJudge(fail), sleeps=sleeps, retries=2).run(
        load_rows(str(data))
    )
    assert len(results) == 4
    assert results[0]["groundedness_result"] == "pass"
    assert results[1]["groundedness_error"] == (
        f"{data}:2: groundedness: chat request refused (500): the judge crashed"
    )
    assert sleeps == [1.0, 2.0]  # a 5xx is retried, then recorded
    assert results[2]["groundedness_error"] == f"{data}:3: no context (needed by groundedness)"
    assert results[3]["error"].startswith(f"{data}:4: not JSON")


def test_a_refused_request_is_not_retried(tmp_path):
    sleeps: list[float] = []
    judge = NumberJudge(lambda call, r: ClientError("chat request refused (400): bad", 400))
    data = write_jsonl(tmp_path / "d.jsonl", warranty_rows(90)[:1])
    (result,) = runner(tmp_path, judge, sleeps=sleeps).run(load_rows(str(data)))
    assert sleeps == [] and len(judge.calls) == 1
    assert "refused (400)" in result["groundedness_error"]


def test_resume_after_a_kill_requests_only_unfinished_rows(tmp_path):
    rows = []
    for days in range(10, 101, 10):  # ten distinct rows, so each request names its row
        rows.append({**warranty_rows(90)[0], "response": f"It lasts {days} days."})
    data = write_jsonl(tmp_path / "d.jsonl", rows)

    def kill_at_fourth(call, response):
        return Killed() if call == 4 else None

    first = NumberJudge(kill_at_fourth)
    with pytest.raises(Killed):
        runner(tmp_path, first, concurrency=1).run(load_rows(str(data)))
    finished = first.calls[:3]
    cached = (tmp_path / "run" / CACHE).read_text().splitlines()
    assert len(cached) == 3 and all(json.loads(line)["key"] for line in cached)

    second = NumberJudge()
    again = runner(tmp_path, second, concurrency=2)
    results = again.run(load_rows(str(data)))
    assert not set(second.calls) & set(finished)
    assert sorted(second.calls) == sorted(r["response"] for r in rows[3:])
    assert again.cached == 3
    # Only 90 is in the context; the cached scores come back with the fresh ones.
    assert [r["groundedness"] for r in results] == [1.0] * 8 + [5.0, 1.0]

    third = NumberJudge()
    runner(tmp_path, third).run(load_rows(str(data)))
    assert third.calls == []


def test_a_changed_judge_or_prompt_is_not_read_from_the_cache(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", warranty_rows(90)[:2])
    runner(tmp_path, NumberJudge()).run(load_rows(str(data)))
    other = NumberJudge()
    other.model = "another-judge"
    runner(tmp_path, other).run(load_rows(str(data)))
    assert len(other.calls) == 2
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    text = "[user]\nCONTEXT:\n{{ context }}\nQUERY:\n{{ query }}\nRESPONSE:\n{{ response }}\n"
    (prompts / "groundedness.md").write_text(text)
    edited = NumberJudge()
    r = runner(tmp_path, edited)
    r.context.prompts_dir = str(prompts)
    r.run(load_rows(str(data)))
    assert len(edited.calls) == 2


class FixedEmbedder:
    """Embeddings by lookup: enough to check the cosine the metric reports."""

    embedding_model = "lookup"

    def embed(self, texts):
        table = {"yes": [1.0, 0.0], "sure": [1.0, 1.0], "no": [0.0, 1.0]}
        return [table[t] for t in texts]


def test_run_level_metrics_in_the_summary(tmp_path):
    from sorai.apps.eval.summary import summarize

    rows = [
        {"response": "positive", "ground_truth": "positive"},
        {"response": "negative", "ground_truth": "positive"},
        {"response": "neutral", "ground_truth": "neutral"},
    ]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    evaluators = resolve(["classification"])
    results = Runner(evaluators, Context(), tmp_path / "c", progress=False).run(
        load_rows(str(data))
    )
    c = summarize(results, evaluators, {})["metrics"]["classification"]
    assert c["accuracy"] == pytest.approx(2 / 3) and c["mean"] == pytest.approx(2 / 3)
    # F1: negative 0, neutral 1, positive 2/3.
    assert c["macro_f1"] == pytest.approx((0 + 1 + 2 / 3) / 3)
    assert c["confusion"] == [[0, 0, 0], [0, 1, 0], [1, 0, 1]]

    rows = [
        {"response": {"a": 1, "b": 2}, "ground_truth": {"a": 1, "b": 3}},
        {"response": '{"a": 5}', "ground_truth": {"a": 5, "c": "x"}},
        {"response": "not json", "ground_truth": {"a": 1}},
    ]
    data = write_jsonl(tmp_path / "e.jsonl", rows)
    evaluators = resolve(["extraction"])
    results = Runner(evaluators, Context(), tmp_path / "e", progress=False).run(
        load_rows(str(data))
    )
    assert results[0]["extraction"] == pytest.approx(0.5)
    assert "response is not JSON" in results[2]["extraction_error"]
    e = summarize(results, evaluators, {})["metrics"]["extraction"]
    # Fields over the two scored rows: 2 right, 3 predicted, 4 expected.
    assert e["micro"] == pytest.approx({"precision": 2 / 3, "recall": 1 / 2, "f1": 4 / 7})
    assert e["per_field"]["a"]["f1"] == 1.0 and e["errors"] == 1

    rows = [{"response": "yes", "ground_truth": "sure"}, {"response": "yes", "ground_truth": "no"}]
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    results = Runner(
        resolve(["embedding_similarity"]),
        Context(embedder=FixedEmbedder()),
        tmp_path / "s",
        progress=False,
    ).run(load_rows(str(data)))
    assert [r["embedding_similarity"] for r in results] == [pytest.approx(2**-0.5), 0.0]
