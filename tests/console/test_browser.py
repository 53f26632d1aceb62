"""The console in headless Chromium against a live keyed server with the default model. The
fast case: the key prompt on a keyless browser, then a chat whose tokens stream in. The rest
(slow): structured output, ask with a citation, eval runs and a comparison, a training chart
that gains points, the agent page, each page at 1280x800 and narrow. Screenshots of each page
go to a temporary directory whose path the run prints."""

from __future__ import annotations

import json

import pytest

from tests.console.conftest import API_KEY

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
    browser.goto(f"{console.url}/#/{page}")
    browser.wait(f"document.querySelector('#page-{page}')")


def _unlock(browser, console) -> None:
    """Loads the console and gives it the key when it asks (once per browser session)."""
    browser.goto(console.url + "/")
    if browser.wait("document.querySelector('#key-gate, #tab-playground') !== null"):
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
