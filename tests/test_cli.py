"""`sorai` on the command line, on the real default model: the console script itself as real
subprocesses (the acceptance command, chat over piped stdin, version and help, the model list),
and the other cases through sorai.cli.main in this process (the `sorai_main` fixture,
tests/conftest.py), which spares each an interpreter's start-up and imports.

Runs that load the model cost seconds each, so the generate and chat runs happen once per
module (fixtures) and several tests read their output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sorai
from sorai import hub
from tests.apps.http_double import JSONHandler, closed_port, serving

# The console script installed next to the interpreter running the tests (the project venv);
# `python -m sorai.cli` is the same entry point where the script is missing.
_SCRIPT = Path(sys.executable).with_name("sorai")
SORAI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "sorai.cli"]

FRANCE = "What is the capital of France?"
GREEDY = ["--temperature", "0", "--max-tokens", "20"]
STATS = re.compile(r"^\[(\d+) prompt tokens, (\d+) generated in ")


def run_sorai(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SORAI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
    )


def assert_user_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 with exactly one `sorai: error: ...` line on stderr; returns that line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sorai: error: ")
    return lines[0]


# ---- generate ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def france_generate(default_gguf: Path) -> subprocess.CompletedProcess[str]:
    """The acceptance command, run once."""
    return run_sorai("generate", "--chat", FRANCE, "--max-tokens", "20", "--temperature", "0")


def test_generate_chat_answers_paris_and_exits_0(
    france_generate: subprocess.CompletedProcess[str],
) -> None:
    assert france_generate.returncode == 0, france_generate.stderr
    assert any("Paris" in line for line in france_generate.stdout.splitlines())


def test_generate_prints_nothing_on_stderr_when_not_verbose(
    france_generate: subprocess.CompletedProcess[str],
) -> None:
    assert france_generate.stderr == ""


# ---- user errors: exit 2, one line, no traceback -------------------------------------------


def _truncated_gguf(tmp_path: Path, default_gguf: Path) -> Path:
    path = tmp_path / "truncated.gguf"
    with open(default_gguf, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    return path


def _text_file_named_gguf(tmp_path: Path, default_gguf: Path) -> Path:
    path = tmp_path / "x.gguf"
    path.write_text("this is plain text, not a model\n")
    return path


def _hf_dir_without_config(tmp_path: Path, default_gguf: Path) -> Path:
    path = tmp_path / "hf-model"
    path.mkdir()
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    ("make_model", "expected"),
    [
        (_truncated_gguf, ["truncated.gguf", "unreadable GGUF file"]),
        (_text_file_named_gguf, ["x.gguf", "not a GGUF file"]),
        (_hf_dir_without_config, ["hf-model", "config.json"]),
    ],
    ids=["truncated-gguf", "text-file-named-gguf", "hf-dir-without-config"],
)
def test_unreadable_model_is_a_one_line_user_error(
    tmp_path: Path, default_gguf: Path, make_model, expected: list[str], sorai_main
) -> None:
    model = make_model(tmp_path, default_gguf)
    line = assert_user_error(sorai_main("generate", "hi", "-m", str(model), "-v"))
    for fragment in expected:
        assert fragment in line


# With -v a completed load prints "loaded ... in N s" on stderr, so a one-line stderr under -v
# also shows these errors are raised before the model is loaded.
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-m", "no-such-model"], ["'no-such-model'", hub.DEFAULT_MODEL]),
        (["--temperature", "-0.5"], ["temperature", "-0.5"]),
        (["--top-p", "1.5"], ["top_p", "1.5"]),
    ],
    ids=["unknown-model", "negative-temperature", "top-p-above-1"],
)
def test_bad_argument_is_a_one_line_user_error_before_loading(
    default_gguf: Path, args: list[str], expected: list[str], sorai_main
) -> None:
    line = assert_user_error(sorai_main("generate", "hi", "-v", *args))
    for fragment in expected:
        assert fragment in line


def test_prompt_longer_than_context_is_a_one_line_user_error(
    default_gguf: Path, sorai_main
) -> None:
    prompt = "hello " * 9000  # ~9000 tokens; the default model's context window is 8192
    line = assert_user_error(sorai_main("generate", "-", stdin=prompt))
    assert "maximum context length is 8192 tokens" in line
    prompt_tokens = re.search(r"\((\d+) in the prompt", line)
    assert prompt_tokens is not None
    assert int(prompt_tokens.group(1)) > 8192


# ---- version, models, help (no model load) -------------------------------------------------


def test_version_prints_name_and_version() -> None:
    result = run_sorai("--version")
    assert result.returncode == 0
    assert result.stdout == f"sorai {sorai.__version__}\n"


def test_no_verb_prints_help_and_exits_2() -> None:
    result = run_sorai()
    assert result.returncode == 2
    assert result.stdout.startswith("usage: sorai")
    for verb in ("chat", "generate", "pull", "models"):
        assert verb in result.stdout


def test_models_lists_the_default_model_with_its_cached_path(default_gguf: Path) -> None:
    result = run_sorai("models")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(hub.DEFAULT_MODEL)]
    assert len(rows) == 1
    assert str(default_gguf) in rows[0]


def test_models_says_not_pulled_in_an_empty_cache(tmp_path: Path) -> None:
    env = {**os.environ, "SORAI_HOME": str(tmp_path)}
    result = run_sorai("models", env=env)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(hub.DEFAULT_MODEL)]
    assert len(rows) == 1
    assert f"not pulled (sorai pull {hub.DEFAULT_MODEL})" in rows[0]
    assert f"cache: {tmp_path}" in result.stdout


# ---- chat through piped stdin --------------------------------------------------------------

CHAT_INPUT = (
    "\n".join(
        [
            "/help",
            FRANCE,  # answer 0
            "/reset",
            FRANCE,  # answer 1: same prompt again, the history is gone
            "/system You are a pirate.",
            FRANCE,  # answer 2: shorter system prompt than the template's default, no history
            "Hello",  # answer 3: carries answer 2's turn as history
            "/bogus",
        ]
    )
    + "\n"
)


@pytest.fixture(scope="module")
def chat_session(default_gguf: Path) -> subprocess.CompletedProcess[str]:
    return run_sorai("chat", *GREEDY, "-v", stdin=CHAT_INPUT)


@pytest.fixture(scope="module")
def chat_prompt_tokens(chat_session: subprocess.CompletedProcess[str]) -> list[int]:
    """Prompt size of each answer, from the -v stats lines."""
    counts = [
        int(m.group(1)) for line in chat_session.stderr.splitlines() if (m := STATS.match(line))
    ]
    assert len(counts) == 4, chat_session.stderr
    return counts


def test_chat_answers_piped_questions_and_exits_0_at_eof(
    chat_session: subprocess.CompletedProcess[str],
) -> None:
    assert chat_session.returncode == 0, chat_session.stderr
    assert "Traceback" not in chat_session.stderr
    assert "Paris" in chat_session.stdout.splitlines()[0]


def test_chat_prints_no_prompt_when_stdin_is_not_a_terminal(
    chat_session: subprocess.CompletedProcess[str],
) -> None:
    assert ">>>" not in chat_session.stdout
    assert "chatting with" not in chat_session.stderr


def test_chat_help_lists_the_commands(chat_session: subprocess.CompletedProcess[str]) -> None:
    for command in ("/reset", "/system TEXT", "/help", "/exit"):
        assert re.search(rf"^\s+{re.escape(command)}\s", chat_session.stderr, re.M), command


def test_chat_first_answer_matches_generate_chat(
    chat_session: subprocess.CompletedProcess[str],
    france_generate: subprocess.CompletedProcess[str],
) -> None:
    # Both greedy over the same single-turn conversation.
    assert chat_session.stdout.splitlines()[0] == france_generate.stdout.splitlines()[0]


def test_chat_reset_forgets_the_conversation(
    chat_session: subprocess.CompletedProcess[str], chat_prompt_tokens: list[int]
) -> None:
    assert "(conversation cleared)" in chat_session.stderr
    assert chat_prompt_tokens[1] == chat_prompt_tokens[0]
    answers = chat_session.stdout.splitlines()
    assert answers[1] == answers[0]


def test_chat_system_replaces_the_system_prompt_and_starts_over(
    chat_session: subprocess.CompletedProcess[str], chat_prompt_tokens: list[int]
) -> None:
    assert "(system prompt set; conversation cleared)" in chat_session.stderr
    # Without history, "You are a pirate." makes the prompt shorter than the template's default
    # system prompt ("You are a helpful AI assistant named SmolLM, trained by Hugging Face").
    assert chat_prompt_tokens[2] < chat_prompt_tokens[0]


def test_chat_keeps_earlier_turns_in_the_prompt(chat_prompt_tokens: list[int]) -> None:
    # "Hello" is shorter than the question, so only the previous turn makes this prompt longer.
    assert chat_prompt_tokens[3] > chat_prompt_tokens[2]


def test_chat_unknown_command_is_reported_and_skipped(
    chat_session: subprocess.CompletedProcess[str],
) -> None:
    assert "unknown command /bogus; /help lists them" in chat_session.stderr
    assert chat_session.returncode == 0


@pytest.mark.parametrize("verb", [["chat"], ["generate", "hi"]])
def test_terminal_sampling_defaults_are_tempered(verb: list[str]) -> None:
    from sorai.cli import build_parser

    args = build_parser().parse_args(verb)
    assert (args.temperature, args.top_p) == (0.7, 0.9)


# ---- mistyped flags and model names (in process; nothing loads) ----------------------------


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """argparse's exit 2 for `argv`: (the usage's first line, the error line)."""
    from sorai.cli import main

    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    lines = capsys.readouterr().err.rstrip("\n").splitlines()
    return lines[0], lines[-1]


@pytest.mark.parametrize(
    ("argv", "prog", "error"),
    [
        (
            ["chat", "--temprature", "0.5"],
            "sorai chat",
            "unrecognized arguments: --temprature 0.5 (did you mean --temperature?)",
        ),
        (
            ["classify", "--lables", "a,b", "x"],
            "sorai classify",
            "unrecognized arguments: --lables (did you mean --labels?)",
        ),
        (
            ["index", "add", "--chunksize", "3", "docs"],
            "sorai index add",
            "unrecognized arguments: --chunksize (did you mean --chunk-size?)",
        ),
        (
            ["generate", "hi", "--temprature", "1", "--topp", "0.5"],
            "sorai generate",
            "unrecognized arguments: --temprature 1 --topp 0.5 "
            "(did you mean --temperature for --temprature, --top-p for --topp?)",
        ),
    ],
    ids=["chat", "classify", "index-add", "two-typos"],
)
def test_a_mistyped_flag_shows_the_verbs_usage_and_the_close_option(
    argv: list[str], prog: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    usage, line = _usage_error(argv, capsys)
    assert usage.startswith(f"usage: {prog} ")  # not the top-level `usage: sorai [-h] ...`
    assert line == f"{prog}: error: {error}"


def test_a_mistyped_flag_is_named_beside_another_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, line = _usage_error(["topics", "--inptu", "texts.jsonl"], capsys)
    assert line == (
        "sorai topics: error: the following arguments are required: --input; "
        "unrecognized arguments: --inptu (did you mean --input?)"
    )


def test_no_hint_when_no_option_is_close_and_an_abbreviation_is_accepted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, line = _usage_error(["chat", "--temp", "0.5", "--bogus"], capsys)
    assert line == "sorai chat: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "-m", "smollm2-135m-instrukt"],
        ["generate", "hi", "-m", "smollm2-135m-instrukt"],
        ["serve", "-m", "smollm2-135m-instrukt"],
        ["pull", "smollm2-135m-instrukt"],
    ],
    ids=["chat", "generate", "serve", "pull"],
)
def test_a_mistyped_model_name_names_the_close_known_model(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from sorai.cli import main

    monkeypatch.setenv("SORAI_HOME", str(tmp_path / "home"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sorai: error: unknown model 'smollm2-135m-instrukt'")
    assert f"(did you mean '{hub.DEFAULT_MODEL}'?)" in err
    assert not (tmp_path / "home").exists()  # nothing pulled


def _sentence_transformers_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "minilm"
    (folder / "1_Pooling").mkdir(parents=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 384}))
    return folder


@pytest.mark.parametrize("verb", [["chat"], ["generate", "hi"], ["serve"]])
@pytest.mark.parametrize("by", ["name", "path"])
def test_an_embedding_model_as_the_chat_model_says_what_it_is(
    verb: list[str], by: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from sorai.cli import main

    monkeypatch.setenv("SORAI_HOME", str(tmp_path / "home"))
    model = (
        hub.DEFAULT_EMBEDDING_MODEL if by == "name" else str(_sentence_transformers_dir(tmp_path))
    )
    assert main([*verb, "-m", model]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"sorai: error: {model!r} is an embedding model (bert); chat, generate and serve --model "
        f"need a chat model such as {hub.DEFAULT_MODEL}; serve it with "
        f"`sorai serve --embedding-model {model}`\n"
    )
    assert not (tmp_path / "home").exists()  # nothing pulled


# ---- generate and chat --url: an OpenAI-compatible endpoint's streams ----------------------


class _StreamingDouble(JSONHandler):
    """Test double for an OpenAI-compatible endpoint serving "served-model" (and an embedding
    model): streams "Hello" + " world" from /v1/completions and /v1/chat/completions, then the
    usage; records each request's path and body. With `key` set it answers others with 401."""

    key: str | None = None
    requests: list[tuple[str, dict]] = []

    def _authorized(self) -> bool:
        if self.key is None or self.headers.get("Authorization") == f"Bearer {self.key}":
            return True
        error = {"message": "incorrect API key provided", "code": "invalid_api_key"}
        self.send_json(401, {"error": error})
        return False

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        if self._authorized():
            cards = [{"id": name, "object": "model", "created": 0, "owned_by": "double"}
                     for name in ("served-model", hub.DEFAULT_EMBEDDING_MODEL)]  # fmt: skip
            self.send_json(200, {"object": "list", "data": cards})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        body = self.read_json()
        self.requests.append((self.path, body))
        chat = self.path.endswith("/chat/completions")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for text, finish in (("Hello", None), (" world", "length")):
            part = {"delta": {"content": text}} if chat else {"text": text}
            choice = {"index": 0, "finish_reason": finish, **part}
            self._event({"choices": [choice]}, chat, body["model"])
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        self._event({"choices": [], "usage": usage}, chat, body["model"])
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, chunk: dict, chat: bool, model: str) -> None:
        kind = "chat.completion.chunk" if chat else "text_completion"
        chunk = {"id": "x", "object": kind, "created": 0, "model": model, **chunk}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())


@pytest.fixture
def endpoint() -> Iterator[type[_StreamingDouble]]:
    class Double(_StreamingDouble):
        requests: list[tuple[str, dict]] = []

    with serving(Double) as url:
        Double.url = url
        yield Double


def test_generate_url_streams_the_endpoints_completion(endpoint, sorai_main) -> None:
    result = sorai_main(
        "generate", "Once upon", "--url", endpoint.url, "-t", "0", "-n", "5", "--top-k", "3",
        "--stop", "END", "-v",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world\n"
    assert STATS.match(result.stderr).groups() == ("3", "2")
    [(path, body)] = endpoint.requests
    assert path == "/v1/completions"
    # --model (the default model) is not served: the endpoint's first chat model answers.
    assert body["model"] == "served-model" and body["prompt"] == "Once upon"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["top_k"]) == (5, 0, 3)
    assert body["stop"] == ["END"]


def test_generate_url_chat_uses_the_chat_endpoint(endpoint, sorai_main) -> None:
    result = sorai_main(
        "generate", "Hi", "--chat", "--system", "Be brief.", "--url", endpoint.url + "/v1/"
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("Hello world\n", "")
    [(path, body)] = endpoint.requests
    assert path == "/v1/chat/completions"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert "top_k" not in body  # sorai's extras go only when not at their default


def test_chat_url_answers_each_line_with_the_conversation_so_far(endpoint, sorai_main) -> None:
    result = sorai_main("chat", "--url", endpoint.url, "-m", "served-model", stdin="Hi\nAnd?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world\nHello world\n"
    [(_, first), (_, second)] = endpoint.requests
    assert first["model"] == second["model"] == "served-model"
    assert second["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello world"},
        {"role": "user", "content": "And?"},
    ]


@pytest.mark.parametrize("verb", [["chat"], ["generate", "hi"]])
def test_url_with_a_refused_key_is_a_one_line_user_error(
    endpoint, verb: list[str], sorai_main
) -> None:
    endpoint.key = "sk-right"
    env = {"SORAI_API_KEY": "sk-wrong"}
    line = assert_user_error(sorai_main(*verb, "--url", endpoint.url, stdin="hi\n", env=env))
    assert "refused the API key (401)" in line and endpoint.url in line
    right = sorai_main(*verb, "--url", endpoint.url, "--api-key", "sk-right", stdin="hi\n", env=env)
    assert right.returncode == 0 and right.stdout == "Hello world\n"


def test_url_at_a_closed_port_is_a_one_line_user_error(tmp_path: Path, sorai_main) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert "cannot reach" in assert_user_error(sorai_main("generate", "hi", "--url", url))
    # The server decides the model: an adapter is refused before anything is asked of it.
    with_adapter = sorai_main("generate", "hi", "--url", url, "--adapter", str(tmp_path))
    assert "--adapter does not apply with --url" in assert_user_error(with_adapter)


def test_verbose_chat_says_how_the_model_runs_on_this_machine(
    chat_session: subprocess.CompletedProcess[str],
) -> None:
    line = next(x for x in chat_session.stderr.splitlines() if x.startswith("running "))
    assert " on cpu; weights: " in line and "cores" in line
