"""A LoRA adapter merged into the real default model: `sorai.load(adapter=...)` and
`--merge-adapter` (served unmerged with `--adapter`: tests/server/test_adapters_live.py).

One adapter is built per module: LoRA (r=4, every Linear of the blocks) applied to the loaded
default model, B set to small random values (enough to change a greedy answer), written with
save_adapter to `<tmp>/faq/adapter`, the layout `sorai train` writes, so the model's name gets
`+faq`. The model with the adapter merged is loaded once; the CLI runs go through sorai.cli.main
in this process (the `sorai_main` fixture), `sorai serve --merge-adapter` is a real subprocess.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from torch import nn

import sorai
from sorai import hub
from sorai.engine.llm import LLM, Completion
from sorai.model.lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    lora_modules,
    merge_lora,
    save_adapter,
)
from tests.server.test_serve_cli import URL_LINE, Process
from tests.test_cli import assert_user_error

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "max_tokens": 8}


@dataclasses.dataclass
class Built:
    adapter: Path
    prompt_ids: torch.Tensor  # [1, seq]: the chat prompt
    logits: torch.Tensor  # of the unmerged LoRALinear model on prompt_ids
    merged: dict[str, torch.Tensor]  # the in-process model's state after merge_lora
    base_chat: str  # the base model's greedy answer to MESSAGES


@pytest.fixture(scope="module")
def built(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    llm = sorai.load(default_gguf, quantize="none")  # LoRA wraps float layers
    base_chat = llm.chat(MESSAGES, max_tokens=16, temperature=0).text
    ids = torch.tensor([llm.tokenizer.encode_chat(MESSAGES)])
    # Seeded before A is drawn too: A came from whatever RNG state earlier tests left, so in
    # some orders of the suite the adapter happened not to change the greedy answer.
    torch.manual_seed(0)
    apply_lora(llm.model, LoRAConfig(r=4, target_modules="all-linear"))
    for module in lora_modules(llm.model).values():
        nn.init.normal_(module.lora_B.weight, std=0.02)
    with torch.no_grad():
        logits = llm.model(ids)
    adapter = tmp_path_factory.mktemp("run") / "faq" / "adapter"
    save_adapter(llm.model, adapter)
    merge_lora(llm.model)
    return Built(adapter, ids, logits, llm.model.state_dict(), base_chat)


@pytest.fixture(scope="module")
def adapted(built: Built, default_gguf: Path) -> LLM:
    return sorai.load(default_gguf, adapter=built.adapter)


@pytest.fixture(scope="module")
def adapted_completion(adapted: LLM) -> Completion:
    """The Python API's greedy continuation of PROMPT: what every other path must give."""
    return adapted.generate(PROMPT, **GREEDY)


def _corrupt_adapter(built: Built, path: Path) -> Path:
    """A copy of the adapter whose weights file is cut short."""
    path.mkdir()
    (path / CONFIG_FILE).write_text((built.adapter / CONFIG_FILE).read_text())
    (path / WEIGHTS_FILE).write_bytes((built.adapter / WEIGHTS_FILE).read_bytes()[:1000])
    return path


# ---- Python API ----------------------------------------------------------------------------


def test_merged_adapter_gives_the_unmerged_logits(
    built: Built, adapted: LLM, default_gguf: Path
) -> None:
    assert adapted.name == f"{default_gguf}+faq"
    # Merged: plain Linears again (the engine reads their weights), still column-major on the
    # CPU in float32 (the merge copies in place).
    assert not any(isinstance(m, LoRALinear) for m in adapted.model.modules())
    q_proj = adapted.model.layers["0"].self_attn.q_proj
    assert type(q_proj) is nn.Linear
    assert q_proj.weight.stride() == (1, q_proj.weight.shape[0])
    # Exactly the weights of merging in process (A and B are read back bit for bit) ...
    state = adapted.model.state_dict()
    assert state.keys() == built.merged.keys()
    assert all(torch.equal(state[key], built.merged[key]) for key in state)
    # ... and the unmerged model's logits, up to rounding: merged and unmerged round
    # differently, float32 logits of up to ~40 differ by ~1.5e-4 at most.
    with torch.no_grad():
        logits = adapted.model(built.prompt_ids)
    torch.testing.assert_close(logits, built.logits, rtol=0, atol=1e-3)


def test_adapter_changes_the_greedy_answer(built: Built, adapted: LLM) -> None:
    answer = adapted.chat(MESSAGES, max_tokens=16, temperature=0).text
    assert answer and answer != built.base_chat


def test_bad_adapter_is_a_lora_error_naming_the_path(built: Built, tmp_path: Path) -> None:
    # All fail before the model loads (else each would take seconds).
    missing = tmp_path / "missing"
    with pytest.raises(LoRAError, match=f"^{re.escape(str(missing))}: no such LoRA adapter"):
        sorai.load(adapter=missing)
    with pytest.raises(LoRAError, match=f"not a PEFT adapter directory .no {CONFIG_FILE}"):
        sorai.load(adapter=tmp_path)
    corrupt = _corrupt_adapter(built, tmp_path / "corrupt") / WEIGHTS_FILE
    with pytest.raises(LoRAError, match=f"^{re.escape(str(corrupt))}: unreadable safetensors"):
        sorai.load(adapter=corrupt.parent)


def test_saved_merged_model_reloads_with_the_same_greedy_tokens(
    adapted: LLM, adapted_completion: Completion, tmp_path: Path
) -> None:
    adapted.save(tmp_path / "merged")
    assert not (tmp_path / "merged" / CONFIG_FILE).exists()
    reloaded = sorai.load(tmp_path / "merged")
    assert reloaded.generate(PROMPT, **GREEDY).token_ids == adapted_completion.token_ids


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_generate_with_adapter_prints_the_python_api_text(
    built: Built, default_gguf: Path, adapted_completion: Completion, sorai_main
) -> None:
    result = sorai_main(
        "generate", "--merge-adapter", str(built.adapter), "-m", str(default_gguf),
        "--temperature", "0", "-n", "8", PROMPT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == adapted_completion.text + "\n"


def test_missing_adapter_is_a_one_line_error_before_loading(tmp_path: Path, sorai_main) -> None:
    missing = tmp_path / "no-such-adapter"
    # -v would print "loaded ..." after a load: one line shows it failed before.
    line = assert_user_error(sorai_main("generate", "hi", "-v", "--adapter", str(missing)))
    assert str(missing) in line


def test_corrupt_adapter_weights_are_a_one_line_error(
    built: Built, tmp_path: Path, sorai_main
) -> None:
    bad = _corrupt_adapter(built, tmp_path / "bad")
    line = assert_user_error(sorai_main("generate", "hi", "-v", "--merge-adapter", str(bad)))
    assert str(bad / WEIGHTS_FILE) in line
    assert "unreadable safetensors file" in line


def test_remote_chat_rejects_adapter(built: Built, sorai_main) -> None:
    result = sorai_main(
        "chat", "--url", "http://127.0.0.1:9", "--adapter", str(built.adapter), stdin="hi\n"
    )
    assert "--adapter" in assert_user_error(result)


# ---- sorai serve ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(built: Built) -> Iterator[tuple[str, str]]:
    process = Process(
        "-m", hub.DEFAULT_MODEL, "--merge-adapter", str(built.adapter), "--port", "0",
        "--max-num-seqs", "2",
    )  # fmt: skip
    try:
        match = process.wait_for(URL_LINE)
        yield match.group(1), match.group(2)
    finally:
        process.stop()


def test_serve_with_adapter_serves_the_adapted_model(
    server: tuple[str, str], adapted_completion: Completion
) -> None:
    name, url = server
    assert name == f"{hub.DEFAULT_MODEL}+faq"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    # The adapted chat model, and the embedding model served beside it.
    assert [m.id for m in client.models.list().data] == [name, hub.DEFAULT_EMBEDDING_MODEL]
    completion = client.completions.create(model=name, prompt=PROMPT, **GREEDY)
    assert completion.choices[0].text == adapted_completion.text
    # The plain base model is not what this server serves.
    with pytest.raises(openai.NotFoundError, match=re.escape(repr(name))):
        client.completions.create(model=hub.DEFAULT_MODEL, prompt=PROMPT, max_tokens=1)


def test_adapter_flag_takes_a_registered_run_name(tmp_path: Path) -> None:
    """`--adapter NAME` for a run `sorai train` registered serves its export under NAME; a
    path or NAME=PATH is taken as given."""
    from sorai.cli import parse_adapters

    export = tmp_path / "faq-run" / "adapter"
    export.mkdir(parents=True)
    (export / "adapter_config.json").write_text("{}")
    hub.register_export(export, export.parent, "smollm2-135m-instruct")
    assert parse_adapters(["faq-run"]) == {"faq-run": str(export.resolve())}
    assert parse_adapters([f"other={export}"]) == {"other": str(export)}
    assert parse_adapters([str(export)]) == {"faq-run": str(export)}
