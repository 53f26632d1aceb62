"""Running: retries with backoff on 429/5xx, errors kept per row, and resume after a kill."""

from __future__ import annotations

import json
import threading

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
    assert [r["groundedness"] for r in results] == [1.0] * 8 + [3.5, 1.0]

    third = NumberJudge()
    runner(tmp_path, third).run(load_rows(str(data)))
    assert third.calls == []


def test_a_torn_last_cache_line_costs_only_its_own_result(tmp_path):
    rows = [{**warranty_rows(90)[0], "response": f"It lasts {d} days."} for d in (30, 60, 90)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    runner(tmp_path, NumberJudge(), concurrency=1).run(load_rows(str(data)))
    cache = tmp_path / "run" / CACHE
    text = cache.read_text()
    cache.write_text(text[: len(text) - 20])  # a kill in the middle of the last write

    second = NumberJudge()
    runner(tmp_path, second).run(load_rows(str(data)))
    assert second.calls == ["It lasts 90 days."]
    # The result judged again was written on a line of its own, so it is read back.
    third = NumberJudge()
    results = runner(tmp_path, third).run(load_rows(str(data)))
    assert third.calls == []
    assert [r["groundedness"] for r in results] == [1.0, 1.0, 3.5]


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
    # A response that is not JSON scores 0, its expected field missed (not left out).
    assert results[2]["extraction"] == 0.0
    assert "response is not JSON" in results[2]["extraction_reason"]
    e = summarize(results, evaluators, {})["metrics"]["extraction"]
    # Fields over the three rows: 2 right, 3 predicted, 5 expected.
    assert e["micro"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 5, "f1": 1 / 2})
    assert e["per_field"]["a"] == pytest.approx({"precision": 1, "recall": 2 / 3, "f1": 0.8})
    assert e["errors"] == 0 and e["mean"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)

    rows = [{"response": "yes", "ground_truth": "sure"}, {"response": "yes", "ground_truth": "no"}]
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    results = Runner(
        resolve(["embedding_similarity"]),
        Context(embedder=FixedEmbedder()),
        tmp_path / "s",
        progress=False,
    ).run(load_rows(str(data)))
    assert [r["embedding_similarity"] for r in results] == [pytest.approx(2**-0.5), 0.0]


def test_a_score_that_is_not_finite_is_the_row_s_error_not_a_broken_report(tmp_path):
    from sorai.apps.eval.registry import register
    from sorai.apps.eval.report import write_run
    from sorai.apps.eval.summary import summarize

    scores = {"a": 1.0, "b": float("nan"), "c": float("inf")}
    register("finite_test", lambda row: scores[row["response"]])
    data = write_jsonl(tmp_path / "d.jsonl", [{"response": k} for k in scores])
    evaluators = resolve(["finite_test"])
    results = Runner(evaluators, Context(), tmp_path / "run", progress=False).run(
        load_rows(str(data))
    )
    assert results[0]["finite_test"] == 1.0
    assert "not a finite number" in results[1]["finite_test_error"]
    assert "not a finite number" in results[2]["finite_test_error"]
    summary = summarize(results, evaluators, {})
    assert summary["metrics"]["finite_test"]["mean"] == 1.0
    write_run(tmp_path / "run", results, summary, evaluators, {})  # raised on NaN before
    assert "not a finite number" in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_refused_key_or_unknown_model_stops_the_run(tmp_path, status):
    # A cloud endpoint answers a wrong key or model the same for every row: stop at once.
    judge = NumberJudge(lambda call, r: ClientError(f"chat request refused ({status}): no", status))
    data = write_jsonl(tmp_path / "d.jsonl", warranty_rows(90)[:5])
    with pytest.raises(ClientError, match=f"refused \\({status}\\)"):
        runner(tmp_path, judge, concurrency=1).run(load_rows(str(data)))
    assert len(judge.calls) == 1


def test_ctrl_c_stops_the_queued_rows(tmp_path, monkeypatch):
    import sorai.apps.eval.runner as runner_module

    second_started, release = threading.Event(), threading.Event()

    def interrupted(futures, return_when):
        futures[0].result()  # the first row finished,
        second_started.wait(timeout=60)  # the second is being judged: the user presses Ctrl-C
        raise KeyboardInterrupt

    class Pool(runner_module.ThreadPoolExecutor):
        def __exit__(self, *exc):
            # The Ctrl-C handler has run (the queued rows are cancelled): the row in flight
            # may finish now. Holding it until here keeps a third row from slipping in first.
            release.set()
            return super().__exit__(*exc)

    def hold_the_second(call, response):
        if call == 2:
            second_started.set()
            release.wait(timeout=60)

    monkeypatch.setattr(runner_module, "wait", interrupted)
    monkeypatch.setattr(runner_module, "ThreadPoolExecutor", Pool)
    judge = NumberJudge(hold_the_second)
    rows = [{**warranty_rows(90)[0], "response": f"It lasts {d} days."} for d in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path, judge, concurrency=1).run(load_rows(str(data)))
    assert len(judge.calls) <= 2  # the finished row and at most the one in flight
    assert len((tmp_path / "run" / CACHE).read_text().splitlines()) == len(judge.calls)


def test_cache_hits_are_counted_exactly_under_concurrency(tmp_path):
    rows = [{"response": f"answer {i}", "ground_truth": f"answer {i % 7}"} for i in range(400)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    metrics = ["f1", "rouge_l", "bleu", "exact_match"]
    runner(tmp_path, None, metrics, concurrency=8).run(load_rows(str(data)))
    again = runner(tmp_path, None, metrics, concurrency=8)
    again.run(load_rows(str(data)))
    assert again.cached == 400 * len(metrics)
    lines = (tmp_path / "run" / CACHE).read_text().splitlines()
    assert len(lines) == 400 * len(metrics) and all(json.loads(x)["key"] for x in lines)
