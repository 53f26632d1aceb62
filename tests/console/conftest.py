"""The console's test server: the real default model behind the real AsyncEngine, with an API
key, the default embedding model, and the console over a small index, two eval runs and a
training run directory (all in a temporary directory); and a headless Chromium to drive it."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sorai import hub
from sorai.console.app import install
from sorai.console.settings import ConsoleSettings
from sorai.server.auth import APIKeys
from sorai.server.state import ServerSettings
from tests.console.browser import Browser, available
from tests.server.conftest import serve_default

API_KEY = "sk-console-test-42"


@dataclass
class Console:
    url: str
    root: Path  # the temporary directory holding the index, eval runs and training runs
    settings: ConsoleSettings

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}


QUESTIONS = [
    ("How long is the warranty?", "The warranty lasts 90 days."),
    ("When do orders ship?", "Orders ship within two business days."),
    ("What does the warranty cover?", "The motor and the jar."),
    ("How long does delivery take?", "Three to five days."),
]


def write_eval_runs(evals: Path) -> None:
    """Two `sorai eval run` runs over the same 12 rows (text metrics: no judge, no model):
    `base` answers half the rows right, `better` all of them."""
    from sorai.apps.eval.data import load_rows
    from sorai.apps.eval.registry import Context, resolve
    from sorai.apps.eval.report import write_run
    from sorai.apps.eval.runner import Runner
    from sorai.apps.eval.summary import summarize

    evaluators = resolve(["f1", "rouge_l"])
    for name, right in (("base", lambda i: i % 2 == 0), ("better", lambda i: True)):
        rows = [
            {
                "query": q,
                "ground_truth": a,
                "response": a if right(i) else "I am not sure about that.",
            }
            for i, (q, a) in enumerate(QUESTIONS * 3)
        ]
        data = evals.parent / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        run_dir = evals / name
        results = Runner(evaluators, Context(), run_dir, progress=False).run(load_rows(str(data)))
        meta = {"data": "questions.jsonl", "finished": "now"}
        write_run(run_dir, results, summarize(results, evaluators, {}), evaluators, meta)


def write_training_run(run: Path) -> None:
    """What `sorai train` leaves in a run directory, faked (a real run is a slow test of its
    own in tests/train): the tests append metric rows as a training run would."""
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "config.yaml").write_text("model: smollm2-135m-instruct\nlora:\n  r: 8\n")
    rows = [{"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 2, "loss": 2.25, "lr": 1e-4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def console(default_llm, default_encoder_dir, tmp_path_factory) -> Iterator[Console]:

    root = tmp_path_factory.mktemp("console")
    for name in ("evals", "runs", "traces"):
        (root / name).mkdir()
    write_eval_runs(root / "evals")
    write_training_run(root / "runs" / "tiny")
    settings = ConsoleSettings(
        # Filled by the tests that need it (building it takes the server's embeddings).
        indexes={"docs": root / "docs.sqlite"},
        eval_dir=root / "evals",
        runs_dir=root / "runs",
        trace_dir=root / "traces",
    )
    server = ServerSettings(
        api_keys=APIKeys([API_KEY]), embedding_model=hub.DEFAULT_EMBEDDING_MODEL
    )
    served = serve_default(default_llm, server, lambda app: install(app, settings))
    yield Console(served.thread.url, root, settings)
    served.thread.stop()


@pytest.fixture(scope="module")
def shots() -> Path:
    """Where the screenshots go (printed, so a person can look at them): a directory of its
    own under the system's temp directory, which pytest's rotation of its basetemp (3 runs,
    shared by every pytest of this user) does not remove."""
    path = Path(tempfile.mkdtemp(prefix="sorai-console-screenshots-"))
    print(f"\nconsole screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory, shots: Path) -> Iterator[Browser]:
    if not available():
        pytest.skip("Chromium is not installed (/usr/bin/chromium; .ci/run installs it)")
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"), shots)
    yield chromium
    chromium.close()
