"""Code completion: `suffix` on /v1/completions builds the fill-in-the-middle prompt of the
model's convention (StarCoder, Qwen2.5-Coder, CodeLlama, DeepSeek-Coder), through a tiny random
code model whose tokenizer has the tokens; the default model has none (test_limits.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sorai.errors import SoraiError
from sorai.model.tokenizer import FimTokens, Tokenizer
from tests.model.reference import write_hf_checkpoint
from tests.server.conftest import Served
from tests.server.harness import ServerThread

CODE = [
    "def add(a, b):\n    return a + b\n",
    "def mul(a, b):\n    return a * b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
]
STARCODER = ["<|endoftext|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"]


def byte_level_tokenizer(specials: list[str]) -> tokenizers.Tokenizer:
    """A small byte-level BPE trained on CODE, with `specials` as special tokens."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CODE * 4, trainer)
    return backend


def word_tokenizer(tokens: list[str]) -> Tokenizer:
    """A tokenizer whose vocabulary is `tokens` (added as special) plus a few words."""
    vocab = {t: i for i, t in enumerate(["<unk>", "a", "b"])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(tokens)
    return Tokenizer(backend, name="words")


@pytest.mark.parametrize(
    ("tokens", "has_end"),
    [
        (["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], False),
        (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"], False),
        (["\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"], True),
        (
            [
                "<\uff5cfim\u2581begin\uff5c>",
                "<\uff5cfim\u2581hole\uff5c>",
                "<\uff5cfim\u2581end\uff5c>",
            ],
            False,
        ),
    ],
)
def test_each_convention_is_found(tokens: list[str], has_end: bool) -> None:
    tokenizer = word_tokenizer(tokens)
    ids = [tokenizer.token_to_id(t) for t in tokens[:3]]
    fim = tokenizer.fim_tokens
    assert fim is not None and [fim.prefix, fim.suffix, fim.middle] == ids
    assert fim.end == ((tokenizer.token_to_id(tokens[3]),) if has_end else ())
    prompt = tokenizer.encode_fim("a b", "b")
    a, b = tokenizer.token_to_id("a"), tokenizer.token_to_id("b")
    assert prompt == [ids[0], a, b, ids[1], b, ids[2]]
    assert tokenizer.encode_fim([a], "") == [ids[0], a, ids[1], ids[2]]


def test_a_tokenizer_without_the_tokens_says_why() -> None:
    tokenizer = word_tokenizer(["<fim_prefix>", "<fim_suffix>"])  # no middle
    assert tokenizer.fim_tokens is None
    with pytest.raises(SoraiError, match="no fill-in-the-middle tokens") as info:
        tokenizer.encode_fim("a", "b")
    assert info.value.param == "suffix"


def test_the_default_model_has_no_fim_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.fim_tokens is None
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert not [t for t in vocab if "fim" in t.lower() or t.endswith(("<PRE>", "<MID>"))]


@pytest.fixture(scope="module")
def code_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama whose byte-level tokenizer has StarCoder's FIM tokens."""
    path = tmp_path_factory.mktemp("tiny-code-model")
    write_hf_checkpoint(path, "llama", vocab_size=320, max_position_embeddings=512)
    byte_level_tokenizer(STARCODER).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


@pytest.fixture(scope="module")
def code_server(code_model: Path) -> Iterator[Served]:
    from sorai.engine.async_engine import AsyncEngine
    from sorai.server.app import create_app
    from sorai.server.state import ServerSettings

    engine = AsyncEngine.from_model(code_model, dtype="float32", device="cpu")
    thread = ServerThread(create_app(engine, ServerSettings(embedding_model=None))).start()
    yield Served(engine, thread)
    thread.stop()


def test_suffix_builds_the_fim_prompt_of_a_code_model(code_server: Served) -> None:
    tokenizer = code_server.engine.tokenizer
    fim = tokenizer.fim_tokens
    assert fim == FimTokens(*(tokenizer.token_to_id(t) for t in STARCODER[1:]))
    client = openai.OpenAI(base_url=code_server.url + "/v1", api_key="none", max_retries=0)
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    reply = client.completions.create(
        model=code_server.model, prompt=prefix, suffix=suffix, max_tokens=4, temperature=0
    )
    expected = tokenizer.encode_fim(prefix, suffix)
    assert expected[0] == fim.prefix and expected[-1] == fim.middle
    assert expected == [fim.prefix, *tokenizer.encode(prefix), fim.suffix,
                        *tokenizer.encode(suffix), fim.middle]  # fmt: skip
    assert reply.usage.prompt_tokens == len(expected)
    assert reply.choices[0].finish_reason in ("length", "stop")
    # Token-id prompts are the prefix as given; a list of prompts is one FIM prompt each.
    ids = tokenizer.encode(prefix)
    many = client.completions.create(
        model=code_server.model, prompt=[ids, ids], suffix=suffix, max_tokens=2, temperature=0
    )
    assert many.usage.prompt_tokens == 2 * len(expected)
    assert many.choices[0].text == many.choices[1].text
    assert reply.choices[0].text.startswith(many.choices[0].text)  # greedy, as the text prompt
