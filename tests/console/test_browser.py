"""The console in headless Chromium against a live keyed server with the default model. The
fast case: the key prompt on a keyless browser, then a chat whose tokens stream in. The rest
(slow): structured output, ask with a citation, eval runs and a comparison, a training chart
that gains points, the agent page, each page at 1280x800 and narrow. Screenshots of each page
go to a temporary directory whose path the run prints."""

from __future__ import annotations

import json

import pytest

from tests.console.conftest import API_KEY
from tests.engine.lora_files import EIGHT, write_adapter

# A MutationObserver keeps every distinct text the first choice showed: a streamed reply
# shows several (a prefix, then more), a reply sent in one piece only its final text.
WATCH_REPLY = """(() => {
  window.__seen = new Set();
  new MutationObserver(() => {
    const reply = document.querySelector('#reply [data-choice="0"]');
    if (reply) window.__seen.add(reply.innerText);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
  return true;
})()"""


def _open(browser, console, page: str) -> None:
    browser.click(f"#tab-{page}")
    browser.wait(f"document.querySelector('#page-{page}') !== null")


def _unlock(browser, console) -> None:
    """Loads the console and gives it the key when it asks (once per browser session)."""
    browser.goto(console.url + "/")
    browser.wait("document.querySelector('#key-gate, #tab-playground') !== null")
    if browser.eval("document.querySelector('#key-gate') !== null"):
        browser.type("#api-key", API_KEY)
        browser.click("#key-submit")
    browser.wait("document.querySelector('#tab-playground') !== null")


def test_key_prompt_then_a_streamed_chat(console, browser):
    browser.goto(console.url + "/")
    browser.wait("document.querySelector('#key-gate') !== null")
    # A keyless browser gets the prompt and nothing else: no model, and the API refuses it.
    assert "smollm" not in browser.eval("document.body.innerText").lower()
    status = browser.eval("fetch('/v1/sorai/evals').then(r => r.status)")
    assert status == 401
    browser.screenshot("key-prompt")
    browser.type("#api-key", "sk-wrong")
    browser.click("#key-submit")
    browser.wait("document.querySelector('[role=alert]') !== null")
    assert "refused" in browser.text("[role=alert]")
    browser.type("#api-key", API_KEY)
    browser.click("#key-submit")
    browser.wait("document.querySelector('#tab-playground') !== null")
    # The key stays in this tab's session storage, never in local storage.
    assert browser.eval("sessionStorage.getItem('sorai.apiKey')") == API_KEY
    assert API_KEY not in json.dumps(browser.eval("Object.assign({}, localStorage)"))

    browser.type("#p-temperature", "0")
    browser.type("#p-max_tokens", "24")
    browser.click("#p-logprobs")
    browser.type("#chat-input", "Name three colours.")
    browser.eval(WATCH_REPLY)
    browser.click("#send")
    browser.wait(
        "document.querySelector('#send') && !document.querySelector('#send').disabled"
        " && document.querySelector('#reply [data-choice=\"0\"]') !== null"
    )
    browser.wait(
        "document.querySelector('#reply [data-choice=\"0\"] .who').innerText.includes('·')"
    )  # the finish reason shows once the stream ended
    final = browser.text('#reply [data-choice="0"]')
    seen = [t for t in browser.eval("[...window.__seen]") if t.strip()]
    assert len(set(seen)) >= 2, seen  # the text grew while it streamed
    tokens = browser.eval("document.querySelectorAll('#reply .tok').length")
    assert 1 <= tokens <= 24  # logprobs on: each token coloured by its probability
    probabilities = browser.eval(
        "[...document.querySelectorAll('#reply .tok')].map(t => +t.dataset.p)"
    )
    assert all(0.0 < p <= 1.0 for p in probabilities)
    assert browser.text("#chat-error") is None, final
    # The conversation is kept in the browser.
    saved = json.loads(browser.eval("localStorage.getItem('sorai.conversations')"))
    assert saved[0]["messages"][0]["content"] == "Name three colours."
    assert saved[0]["messages"][1]["role"] == "assistant"
    browser.click("#view-code")
    python = browser.text("#code-python")
    assert "from openai import OpenAI" in python and "max_tokens=24" in python
    assert "logprobs=True" in python and "curl -N" in browser.text("#code-curl")
    assert API_KEY not in python + browser.text("#code-curl")
    browser.screenshot("playground")
    assert not browser.errors, browser.errors


# -- slow: the other pages -------------------------------------------------------------------


@pytest.mark.slow
def test_a_schema_constrained_reply_is_valid_json(console, browser):
    import jsonschema

    _unlock(browser, console)
    _open(browser, console, "playground")
    browser.click("#new-conversation")
    browser.type("#p-temperature", "0")
    browser.type("#p-max_tokens", "60")
    browser.select("#structured-kind", "json_schema")
    schema = json.loads(browser.eval("document.querySelector('#structured-spec').value"))
    browser.type("#chat-input", "Invent a person.")
    browser.click("#send")
    browser.wait("document.querySelector('#json-check-0') !== null")
    assert browser.text("#json-check-0") == "valid JSON"
    reply = browser.eval("document.querySelector('#reply [data-choice=\"0\"] .content').innerText")
    jsonschema.validate(json.loads(reply), schema)
    python = (browser.click("#view-code"), browser.text("#code-python"))[1]
    assert '"type": "json_schema"' in python
    browser.screenshot("playground-json-schema")
    assert not browser.errors, browser.errors


@pytest.mark.slow
def test_two_choices_and_a_tool_call(console, browser):
    _unlock(browser, console)
    _open(browser, console, "playground")
    browser.click("#new-conversation")
    browser.type("#p-max_tokens", "40")
    browser.type("#p-temperature", "0.8")
    browser.type("#p-n", "2")
    browser.click("#use-tools")
    browser.wait("document.querySelector('#tools') !== null")  # the get_weather example
    browser.select("#tool-choice", "required")
    browser.type("#chat-input", "What is the weather in Paris? Call the tool.")
    browser.click("#send")
    browser.wait(
        "document.querySelectorAll('#reply [data-choice] .who').length === 2 && [...document"
        ".querySelectorAll('#reply [data-choice] .who')].every(w => w.innerText.includes('·'))"
    )
    assert browser.text("#chat-error") is None, browser.text("#chat-error")
    calls = browser.eval(
        "[...document.querySelectorAll('#reply .tool-calls')].map(e => JSON.parse(e.innerText))"
    )
    # tool_choice required: each choice is a call, decoded under the tool's schema.
    assert len(calls) == 2, calls
    for made in calls:
        assert made and all(c["name"] == "get_weather" for c in made)
        assert all(isinstance(json.loads(c["arguments"])["city"], str) for c in made)
    browser.screenshot("playground-n2-tools")
    assert not browser.errors, browser.errors


@pytest.fixture(scope="module")
def small_index(console):
    """The index the console serves as `docs`: three small files, embedded by the server."""
    from sorai.apps.client import Client
    from sorai.apps.rag import Index, add_files

    docs = console.root / "docs"
    docs.mkdir()
    (docs / "warranty.md").write_text(
        "# Warranty\n\nThe ABC blender comes with a warranty of 90 days from the date of "
        "purchase. The warranty covers the motor and the jar.\n"
    )
    (docs / "shipping.txt").write_text(
        "Orders ship within two business days. Delivery takes three to five days.\n"
    )
    (docs / "hours.txt").write_text(
        "The shop opens at 10 and closes at 8, every day but Wednesday.\n"
    )
    with (
        Client.connect(console.url, API_KEY) as client,
        Index(console.settings.indexes["docs"]) as index,
    ):
        report = add_files(index, [docs], client)
    assert report.failures == []
    return docs


@pytest.mark.slow
def test_search_and_ask_with_a_citation_that_opens_its_passage(console, browser, small_index):
    _unlock(browser, console)
    _open(browser, console, "data")
    browser.wait("document.querySelector('#data-query') !== null")
    browser.type("#data-query", "warranty days")
    browser.select("#search-mode", "keyword")
    browser.click("#search")
    browser.wait("document.querySelectorAll('#hits .hit').length > 0")
    assert "warranty.md" in browser.text("#hits .hit") and "score" in browser.text("#hits .hit")
    browser.type("#data-query", "How long is the warranty of the ABC blender?")
    browser.select("#search-mode", "hybrid")
    browser.click("#ask")
    browser.wait("document.querySelector('#answer') !== null")
    assert "90" in browser.text("#answer")
    browser.click("#citations .citation")
    browser.wait("document.querySelector('#passage-text') !== null")
    assert "90 days" in browser.text("#passage-text")
    browser.screenshot("data-ask")
    assert not browser.errors, browser.errors


@pytest.mark.slow
def test_an_eval_run_and_a_comparison(console, browser):
    _unlock(browser, console)
    _open(browser, console, "evals")
    browser.click('[data-run="base"]')
    browser.wait("document.querySelector('#eval-summary') !== null")
    assert browser.eval("document.querySelectorAll('#eval-rows tbody tr').length") == 12
    assert browser.eval("document.querySelectorAll('.bars').length") == 2  # f1, rouge_l
    browser.type("#row-filter", "warranty")
    browser.wait("document.querySelector('#rows-shown').innerText.startsWith('6 of 12')")
    browser.screenshot("evals-run")
    browser.select("#compare-a", "base")
    browser.select("#compare-b", "better")
    browser.click("#compare")
    browser.wait("document.querySelector('#compare-table') !== null")
    table = browser.text("#compare-table")
    assert "f1" in table and "rouge_l" in table and "better" in table
    browser.screenshot("evals-compare")
    assert not browser.errors, browser.errors


@pytest.mark.slow
def test_a_training_chart_gains_points_as_the_run_writes_them(console, browser):
    # The run directory is faked (conftest.write_training_run) and this test appends the rows
    # a training run would write; a real `sorai train` run is tests/train's to test.
    _unlock(browser, console)
    _open(browser, console, "training")
    browser.click('[data-run="tiny"]')
    browser.wait("document.querySelector('#chart-loss[data-points=\"2\"]') !== null")
    assert "sorai serve --model smollm2-135m-instruct --adapter" in browser.text("#serve-command")
    with (console.root / "runs" / "tiny" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 2.0, "lr": 1e-4}) + "\n")
        f.write(json.dumps({"step": 3, "val_loss": 2.1}) + "\n")
    browser.wait("document.querySelector('#chart-loss[data-points=\"3\"]') !== null")
    assert "step 3" in browser.text("#training-points")
    browser.screenshot("training")
    assert not browser.errors, browser.errors


@pytest.mark.slow
def test_models_and_an_agent_run(console, browser):
    _unlock(browser, console)
    _open(browser, console, "models")
    browser.wait("document.querySelector('#metrics-now') !== null")
    assert "smollm2-135m-instruct" in browser.text(".model-card")
    browser.screenshot("models")
    _open(browser, console, "agents")
    browser.type("#agent-task", "What is 12 * 7? Use the calculator.")
    browser.click("#agent-run")
    browser.wait("document.querySelector('#agent-answer, [role=alert]') !== null")
    assert browser.text("[role=alert]") is None, browser.text("[role=alert]")
    assert browser.eval("document.querySelectorAll('#agent-steps .step').length") >= 1
    browser.screenshot("agents")
    traces = list((console.root / "traces").glob("*.json"))
    assert len(traces) == 1  # the run's trace, saved where the server was told
    assert not browser.errors, browser.errors


@pytest.mark.slow
def test_an_adapter_loaded_and_unloaded_from_the_models_page(
    console, browser, default_llm, tmp_path
):
    adapter = write_adapter(tmp_path / "faq", default_llm.model, EIGHT[1], seed=0)
    _unlock(browser, console)
    _open(browser, console, "models")
    browser.type("#adapter-name", "faq")
    browser.type("#adapter-path", str(tmp_path / "nowhere"))
    browser.click("#adapter-submit")
    browser.wait("document.querySelector('#adapter-note[role=alert]') !== null")
    assert "nowhere" in browser.text("#adapter-note")  # the server's 400 names the path
    browser.type("#adapter-path", str(adapter))
    browser.click("#adapter-submit")
    browser.wait("document.querySelector('[data-adapter=faq]') !== null")
    assert "smollm2-135m-instruct+faq" in browser.eval(
        "[...document.querySelectorAll('.model-card')].map(c => c.innerText).join(' ')"
    )
    browser.screenshot("models-adapter")
    browser.click("[data-adapter=faq]")
    browser.wait("document.querySelector('[data-adapter=faq]') === null")
    assert not browser.errors, browser.errors


@pytest.mark.slow
def test_every_page_fits_a_narrow_window_and_follows_dark_mode(console, browser):
    _unlock(browser, console)
    browser.viewport(420, 800)
    try:
        for page in ("playground", "models", "data", "evals", "training", "agents"):
            _open(browser, console, page)
            width = browser.eval("document.documentElement.scrollWidth")
            assert width <= 430, (page, width)
            # Every control is labelled, and reachable with Tab (nothing taken out of the order).
            unlabelled = browser.eval(
                "[...document.querySelectorAll('input, select, textarea')]"
                ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)"
            )
            assert unlabelled == [], (page, unlabelled)
            assert (
                browser.eval("document.querySelectorAll('[tabindex^=\"-\"]:not(#passage)').length")
                == 0
            )
            browser.screenshot(f"narrow-{page}")
    finally:
        browser.viewport(1280, 800)
    # Dark: the system's setting (prefers-color-scheme) turns the page dark.
    browser.send(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    try:
        _open(browser, console, "evals")
        background = browser.eval("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(17, 20, 24)", background
        browser.screenshot("dark-evals")
    finally:
        browser.send("Emulation.setEmulatedMedia", {"features": []})
    assert not browser.errors, browser.errors
