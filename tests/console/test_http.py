"""The console's endpoints over plain HTTP: without the key every data endpoint answers 401
and nothing else; the page and its assets load without one; with the key, the eval, training
and index data come back."""

from __future__ import annotations

import http.client
from urllib.parse import urlparse

import httpx
import pytest

from sorai.console.settings import parse_indexes
from sorai.errors import SoraiError

# Every data endpoint the console adds, with a body for the POSTs.
DATA_ENDPOINTS = [
    ("GET", "/v1/sorai/indexes", None),
    ("POST", "/v1/sorai/indexes/docs/search", {"query": "warranty"}),
    ("POST", "/v1/sorai/indexes/docs/ask", {"question": "How long is the warranty?"}),
    ("GET", "/v1/sorai/indexes/docs/chunks/1", None),
    ("GET", "/v1/sorai/evals", None),
    ("GET", "/v1/sorai/evals/base", None),
    ("GET", "/v1/sorai/evals/base/compare/better", None),
    ("GET", "/v1/sorai/training", None),
    ("GET", "/v1/sorai/training/tiny", None),
    ("POST", "/v1/sorai/agents/run", {"task": "What is 2 + 2?"}),
    ("GET", "/v1/sorai/agents/traces", None),
    ("GET", "/v1/sorai/agents/traces/20260101-000000-abcdef.json", None),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_every_data_endpoint_refuses_a_request_without_the_key(console, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for method, path, body in DATA_ENDPOINTS:
        response = httpx.request(method, console.url + path, json=body, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        # Nothing of the data: no run, index or model name in the refusal.
        for secret in ("base", "better", "tiny", "docs", "smollm"):
            assert secret not in response.text.lower().replace("bearer", "")


def test_the_page_and_its_assets_load_without_a_key_and_hold_no_data(console):
    page = httpx.get(console.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/console/app.js" in page.text and "smollm" not in page.text.lower()
    for asset in ("/console/app.js", "/console/vendor/htm-preact-standalone.module.js"):
        response = httpx.get(console.url + asset)
        assert response.status_code == 200 and "javascript" in response.headers["content-type"]


def test_a_path_out_of_the_assets_reaches_nothing(console):
    # http.client sends the path as written (httpx would normalize the dots away): the open
    # /console/ prefix must not open the API behind it.
    url = urlparse(console.url)
    for path in ("/console/../v1/models", "/console/%2e%2e/v1/models", "/console/../../etc/passwd"):
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode("utf-8", "replace")
        connection.close()
        assert response.status in (401, 404), (path, response.status)
        assert "smollm" not in body.lower() and "root:" not in body


def test_eval_and_training_data_come_back_with_the_key(console):
    get = lambda path: httpx.get(console.url + path, headers=console.headers, timeout=60)  # noqa: E731
    runs = get("/v1/sorai/evals").json()
    assert [r["name"] for r in runs["data"]] == ["base", "better"]
    run = get("/v1/sorai/evals/base").json()
    assert run["total_rows"] == 12 and len(run["rows"]) == 12
    assert set(run["histograms"]) == {"f1", "rouge_l"}
    assert sum(b["count"] for b in run["histograms"]["f1"]) == 12
    diff = {d["metric"]: d for d in get("/v1/sorai/evals/base/compare/better").json()["metrics"]}
    assert diff["f1"]["pairs"] == 12 and diff["f1"]["diff"] > 0
    assert diff["f1"]["low"] <= diff["f1"]["diff"] <= diff["f1"]["high"]
    missing = get("/v1/sorai/evals/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert get("/v1/sorai/evals/..%2F..%2Fetc").status_code == 404

    tiny = get("/v1/sorai/training/tiny").json()
    assert [r["step"] for r in tiny["metrics"]] == [1, 2] and tiny["next"] == 2
    assert tiny["checkpoints"] == ["step-000002"] and tiny["exports"] == ["adapter"]
    assert tiny["serve"].startswith("sorai serve --model smollm2-135m-instruct --adapter ")
    # Only the rows after the ones the page has: what a chart following a run asks for.
    assert get("/v1/sorai/training/tiny?after=2").json()["metrics"] == []


def test_index_flags_are_checked(tmp_path):
    index = tmp_path / "docs.sqlite"
    index.write_bytes(b"")
    assert parse_indexes([f"a={index}", f"b={index}"]) == {"a": index, "b": index}
    assert parse_indexes([str(index)]) == {"docs": index}
    with pytest.raises(SoraiError, match="given twice"):
        parse_indexes([f"a={index}", f"a={index}"])
    with pytest.raises(SoraiError, match="no such index file"):
        parse_indexes([f"a={tmp_path / 'missing.sqlite'}"])
    with pytest.raises(SoraiError, match="must be letters"):
        parse_indexes([f"a b={index}"])


def test_serve_checks_the_console_flags_before_loading(sorai_main, tmp_path):
    result = sorai_main("serve", "--eval-dir", str(tmp_path / "missing"))
    assert result.returncode == 2 and "--eval-dir" in result.stderr
    assert "is not a directory" in result.stderr


def test_serve_adds_the_console_unless_told_not_to(tmp_path):
    from sorai.cli import build_parser
    from sorai.console.command import extension

    parser = build_parser()
    assert extension(parser.parse_args(["serve", "--no-console"])) is None
    args = parser.parse_args(["serve", "--eval-dir", str(tmp_path), "--runs-dir", str(tmp_path)])
    assert callable(extension(args))
    with pytest.raises(SoraiError, match="--runs-dir .* is not a directory"):
        extension(parser.parse_args(["serve", "--runs-dir", str(tmp_path / "nope")]))


def test_bad_requests_are_400s_that_name_the_field(console):
    post = lambda path, **kw: httpx.post(console.url + path, headers=console.headers, **kw)  # noqa: E731
    cases = [
        ("/v1/sorai/indexes/docs/search", {"json": {"query": "x", "k": 0}}, "k must be"),
        ("/v1/sorai/indexes/docs/ask", {"json": {"question": " "}}, "question must be"),
        ("/v1/sorai/indexes/docs/search", {"content": b"{not json"}, "JSON object"),
        ("/v1/sorai/agents/run", {"json": {"task": "x", "tools": ["python"]}}, "tools must"),
        ("/v1/sorai/agents/run", {"json": {"task": "x", "strategy": "y"}}, "strategy must"),
    ]
    for path, body, message in cases:
        response = post(path, **body)
        assert response.status_code == 400 and message in response.json()["error"]["message"]
    missing = post("/v1/sorai/indexes/nope/search", json={"query": "x"})
    assert missing.status_code == 404 and "docs" in missing.json()["error"]["message"]
