"""Tokenizer ids, text and chat templates must match transformers, the reference, exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from sorai.errors import ModelFormatError, SoraiError
from sorai.model.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

JAPANESE = "東京は日本の首都です。富士山について教えてください。"
EMOJI = "Hello 👋🏽 world 🇯🇵 👨‍👩‍👧 done"

PLAIN_TEXTS = [
    "Hello, world!",
    "12345 apples cost 3.14159 each, total 1,000,000.",
    "spaces   runs \t tabs\n\n\nnewlines  \r\n end  ",
    " leading space",
    "",
    JAPANESE,
    EMOJI,
    "mixed 日本語 and English 2024年12月31日",
    "don't we'll they're I'M",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "special in the middle<|endoftext|>of text",
    "def f(x):\n    return x ** 2  # code\n",
]

CONVERSATIONS = {
    "english": [{"role": "user", "content": "What is the capital of France?"}],
    "english_system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    "japanese": [{"role": "user", "content": JAPANESE}],
    "japanese_system": [
        {"role": "system", "content": "あなたは親切なアシスタントです。"},
        {"role": "user", "content": JAPANESE},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi! 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 東京 in romaji? 🙂"},
    ],
}

# The Llama 2 template: it writes bos_token itself and rejects bad role order via raise_exception.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer! Hello again.",
    "東京は日本の首都です。",
    "numbers 12345 and more words here",
] * 10

SPM_TEXTS = [
    "Hello world",
    "  two leading spaces and trailing  ",
    "The lazy dog's 42 bones",
    JAPANESE,
    EMOJI,
    "<s>[INST] hi [/INST] ok</s>",
    "<think>reasoning</think> answer",
]


def _gguf_metadata(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.fixture(scope="module")
def metadata(default_gguf: Path) -> dict[str, Any]:
    return _gguf_metadata(default_gguf)


@pytest.fixture(scope="module")
def tok(metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def hf(default_gguf: Path) -> Any:
    # The slow part of this file (~10 s): load the reference once.
    return transformers.AutoTokenizer.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name
    )


@pytest.fixture(scope="module")
def saved_dir(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf_saved")
    hf.save_pretrained(path)
    return path


def _spm_backend() -> tokenizers.Tokenizer:
    """A small SentencePiece-style BPE (Metaspace "▁", byte fallback), trained from scratch."""
    trained = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    trained.train_from_iterator(SPM_CORPUS, trainer)
    # Rebuild so the byte tokens are plain vocabulary, as in a real Llama tokenizer.json; the
    # trainer made them special added tokens, which decoding would skip.
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m) for m in model["merges"]]
    backend = tokenizers.Tokenizer(
        models.BPE(model["vocab"], merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    return backend


@pytest.fixture(scope="module")
def spm_metadata() -> dict[str, Any]:
    """GGUF metadata as llama.cpp writes it for a SentencePiece model: scores, no merges."""
    vocab = _spm_backend().get_vocab()
    tokens = sorted(vocab, key=vocab.get) + ["<think>", "</think>"]
    types = []
    for tok in tokens:
        if tok == "<unk>":
            types.append(2)
        elif tok in ("<s>", "</s>"):
            types.append(3)
        elif tok.startswith("<0x"):
            types.append(6)
        elif tok in ("<think>", "</think>"):
            types.append(4)
        else:
            types.append(1)
    # Later merges have higher ids, so -id ranks them the way SentencePiece scores do.
    scores = [-float(i) if t == 1 else 0.0 for i, t in enumerate(types)]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": LLAMA2_TEMPLATE,
    }


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly trained Llama-2-style HF tokenizer directory that adds BOS."""
    backend = _spm_backend()
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=LLAMA2_TEMPLATE,
    )
    path = tmp_path_factory.mktemp("spm_dir")
    fast.save_pretrained(path)
    return path


# ---- the embedded GGUF model against transformers ----


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_ids_match_hf(tok: Tokenizer, hf: Any, name: str) -> None:
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tok.encode_chat(messages) == list(expected["input_ids"])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_text_matches_hf(tok: Tokenizer, hf: Any, name: str) -> None:
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_encode_matches_hf(tok: Tokenizer, hf: Any, text: str) -> None:
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_decode_matches_hf(tok: Tokenizer, hf: Any, text: str) -> None:
    ids = hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_in_text_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]


def test_gguf_special_token_fields(tok: Tokenizer, hf: Any, metadata: dict[str, Any]) -> None:
    assert tok.vocab_size == len(hf) == 49152
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids == (2,)
    assert tok.add_bos_token is False
    assert tok.chat_template == metadata["tokenizer.chat_template"]
    assert (tok.token_to_id("<|endoftext|>"), tok.id_to_token(2)) == (0, "<|im_end|>")


def test_smollm_pretokenizer_is_the_original_digits_split(tok: Tokenizer) -> None:
    # SmolLM2's tokenizer.json splits every digit; transformers' GGUF loader drops that step.
    pre = tok.backend.pre_tokenizer.pre_tokenize_str("x 2024")
    assert [piece for piece, _ in pre] == ["x", "Ġ", "2", "0", "2", "4"]


@pytest.fixture(scope="module")
def original_smollm(hf: Any) -> tokenizers.Tokenizer:
    """The reference with SmolLM2's original tokenizer.json pre-tokenizer put back.

    transformers' GGUF loader gives it plain ByteLevel, dropping the Digits step, so whitespace
    before a digit splits differently ("5  7": it gives Ġ Ġ 7, the original and llama.cpp ĠĠ 7).
    """
    original = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return original


def test_whitespace_before_digits_follows_original_tokenizer(
    tok: Tokenizer, original_smollm: tokenizers.Tokenizer
) -> None:
    assert tok.encode("5  7") == original_smollm.encode("5  7").ids == [37, 256, 39]


def test_random_strings_match_original_tokenizer(
    tok: Tokenizer, original_smollm: tokenizers.Tokenizer
) -> None:
    rng = random.Random(1234)
    alphabet = [*"abcXYZ 0123456789\n\t.,'!?-_()", *"東京日本語のはです。ー", "👋", "🏽", "\u200d"]
    alphabet += ["é", "e\u0301", "<|im_end|>", "<|im_start|>", "  ", "'s", "'ll"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(text)
        assert ids == original_smollm.encode(text, add_special_tokens=False).ids, text
        pieces = _stream(IncrementalDetokenizer(tok), ids)
        assert all("\ufffd" not in piece for piece in pieces), text
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), text


# ---- incremental detokenization ----


@pytest.mark.parametrize("text", [JAPANESE, EMOJI, "The quick brown fox, 12 times.\n  Done!"])
def test_detokenizer_pieces_are_whole_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = _stream(detok, ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert detok.text == text


def test_detokenizer_holds_back_partial_japanese_character(tok: Tokenizer) -> None:
    ids = tok.encode("東")
    assert len(ids) == 2  # one character, two byte-level tokens
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[0]) == ""
    assert detok.add(ids[1]) == "東"
    assert detok.flush() == ""


def test_detokenizer_flush_drops_a_character_cut_in_its_bytes(tok: Tokenizer) -> None:
    # A stream that ends (max_tokens, a stop) inside a character: its bytes would be U+FFFD.
    detok = IncrementalDetokenizer(tok)
    assert detok.add(tok.encode("東")[0]) == ""
    assert detok.flush() == ""
    detok = IncrementalDetokenizer(tok)
    pieces = _stream(detok, tok.encode("日本") + tok.encode("東")[:1])
    assert "".join(pieces) == detok.text == "日本"


def test_detokenizer_continues_after_prompt(tok: Tokenizer) -> None:
    prompt = tok.encode_chat(CONVERSATIONS["japanese"])
    reply = tok.encode("富士山は日本一高い山です。<|im_end|>")
    pieces = _stream(IncrementalDetokenizer(tok, prompt_ids=prompt), reply)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == "富士山は日本一高い山です。"


def test_detokenizer_keeps_special_tokens_when_asked(tok: Tokenizer) -> None:
    ids = tok.encode("ok<|im_end|>")
    skipping = "".join(_stream(IncrementalDetokenizer(tok), ids))
    keeping = "".join(_stream(IncrementalDetokenizer(tok, skip_special_tokens=False), ids))
    assert (skipping, keeping) == ("ok", "ok<|im_end|>")


# ---- Hugging Face directories ----


def test_from_dir_of_saved_reference_matches_hf(saved_dir: Path, hf: Any) -> None:
    assert (saved_dir / "chat_template.jinja").is_file()  # the newer transformers layout
    loaded = Tokenizer.from_dir(saved_dir)
    assert loaded.chat_template == hf.chat_template
    assert (loaded.bos_token, loaded.eos_token_ids, loaded.vocab_size) == (
        "<|im_start|>",
        (2,),
        49152,
    )
    for text in PLAIN_TEXTS:
        assert loaded.encode(text) == hf.encode(text, add_special_tokens=False)
    for messages in CONVERSATIONS.values():
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert loaded.encode_chat(messages) == list(expected["input_ids"])


def test_from_dir_reads_template_from_tokenizer_config(saved_dir: Path, tmp_path: Path) -> None:
    # The older layout: the template inside tokenizer_config.json, no chat_template.jinja.
    template = (saved_dir / "chat_template.jinja").read_text(encoding="utf-8")
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == template


def test_from_dir_reads_chat_template_json(saved_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.json").write_text(
        json.dumps({"chat_template": "{{ messages[0]['content'] }}"}), encoding="utf-8"
    )
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_from_dir_collects_generation_config_eos_ids(saved_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((saved_dir / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [0, 2]}), encoding="utf-8"
    )
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (2, 0)


def test_from_dir_adds_template_end_of_turn_token(saved_dir: Path, tmp_path: Path) -> None:
    # eos is the pretraining <|endoftext|>, but chat replies end with the template's <|im_end|>.
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_bytes((saved_dir / "chat_template.jinja").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>"}), encoding="utf-8"
    )
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (0, 2)


def test_from_dir_picks_tool_use_template_for_tools(saved_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    templates = [
        {"name": "default", "template": "plain"},
        {"name": "tool_use", "template": "{{ tools | tojson }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": templates}), encoding="utf-8"
    )
    loaded = Tokenizer.from_dir(tmp_path)
    tools = [{"name": "天気", "parameters": {}}]
    assert loaded.apply_chat_template([], tools=tools) == '[{"name": "天気", "parameters": {}}]'
    assert loaded.apply_chat_template([]) == "plain"
    assert loaded.renders_tools  # so the chat renderer hands it the tools natively


def test_random_sentencepiece_dir_matches_hf(spm_dir: Path) -> None:
    hf_spm = transformers.AutoTokenizer.from_pretrained(spm_dir)
    loaded = Tokenizer.from_dir(spm_dir)
    assert loaded.add_bos_token is True
    assert (loaded.bos_token, loaded.bos_token_id, loaded.eos_token_ids) == ("<s>", 1, (2,))
    for text in SPM_TEXTS:
        assert loaded.encode(text, add_special_tokens=True) == hf_spm.encode(text), text
        ids = hf_spm.encode(text, add_special_tokens=False)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids, skip_special_tokens=True) == hf_spm.decode(
            ids, skip_special_tokens=True
        )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": JAPANESE},
        {"role": "assistant", "content": "Hello world"},
        {"role": "user", "content": "The lazy dog?"},
    ]
    expected = hf_spm.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert loaded.encode_chat(messages) == list(expected["input_ids"])


@pytest.mark.parametrize("text", ["Hello world, hello again.", JAPANESE, EMOJI])
def test_detokenizer_sentencepiece_spacing(spm_dir: Path, text: str) -> None:
    loaded = Tokenizer.from_dir(spm_dir)
    ids = loaded.encode(text, add_special_tokens=True)
    pieces = _stream(IncrementalDetokenizer(loaded), ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == loaded.decode(ids, skip_special_tokens=True) == text


def test_detokenizer_sentencepiece_keeps_space_after_prompt(spm_dir: Path) -> None:
    loaded = Tokenizer.from_dir(spm_dir)
    prompt = loaded.encode("Hello", add_special_tokens=True)
    reply = loaded.encode("Hello world")[1:]  # "▁world": its space must survive
    pieces = _stream(IncrementalDetokenizer(loaded, prompt_ids=prompt), reply)
    assert "".join(pieces) == " world"


# ---- GGUF metadata variants ----


def test_sentencepiece_gguf_matches_hf_conversion(spm_metadata: dict[str, Any]) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    ours = Tokenizer.from_gguf_metadata(spm_metadata)
    names = {
        "tokenizer.ggml.model": "tokenizer_type",
        "tokenizer.ggml.tokens": "tokens",
        "tokenizer.ggml.scores": "scores",
        "tokenizer.ggml.token_type": "token_type",
        "tokenizer.ggml.unknown_token_id": "unk_token_id",
        "tokenizer.ggml.bos_token_id": "bos_token_id",
        "tokenizer.ggml.eos_token_id": "eos_token_id",
    }
    reference, _ = convert_gguf_tokenizer("llama", {v: spm_metadata[k] for k, v in names.items()})
    for text in SPM_TEXTS:
        ids = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    assert ours.add_bos_token is True
    assert ours.encode("Hello", add_special_tokens=True)[0] == 1
    assert ours.eos_token_ids == (2,)


def test_sentencepiece_gguf_detokenizer(spm_metadata: dict[str, Any]) -> None:
    ours = Tokenizer.from_gguf_metadata(spm_metadata)
    text = "Hello world " + JAPANESE + " " + EMOJI
    ids = ours.encode(text)
    pieces = _stream(IncrementalDetokenizer(ours), ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == ours.decode(ids) == text


def _tiny_byte_level(pre: str) -> Tokenizer:
    alphabet = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    tokens = ["<|endoftext|>", *alphabet, "12", "1212"]
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
            "tokenizer.ggml.merges": ["1 2", "12 12"],
            "tokenizer.ggml.eos_token_id": 0,
        }
    )


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt2", ["1212"]),  # GPT-2 regex keeps the number whole
        ("default", ["1212"]),
        ("never-heard-of-it", ["1212"]),
        ("llama-bpe", ["12", "1", "2"]),  # Llama 3 splits numbers into 3-digit groups
        ("smollm", ["1", "2", "1", "2"]),  # StarCoder-family: every digit alone
        ("qwen2", ["1", "2", "1", "2"]),
    ],
)
def test_gguf_pre_tokenizer_mapping(pre: str, pieces: list[str]) -> None:
    tiny = _tiny_byte_level(pre)
    assert [tiny.id_to_token(i) for i in tiny.encode("1212")] == pieces


def test_qwen2_pre_tokenizer_normalizes_to_nfc() -> None:
    assert _tiny_byte_level("qwen2").encode("e\u0301") == _tiny_byte_level("qwen2").encode("é")
    assert _tiny_byte_level("gpt2").encode("e\u0301") != _tiny_byte_level("gpt2").encode("é")


# ---- chat template behaviour and bad input ----


def _with_template(saved_dir: Path, tmp_path: Path, template: str) -> Tokenizer:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return Tokenizer.from_dir(tmp_path)


def test_template_helpers(saved_dir: Path, tmp_path: Path) -> None:
    template = (
        "{{ messages | tojson(indent=1) }}|{{ '<&>' | tojson }}|{{ strftime_now('%Y') | length }}"
        "|{% generation %}{{ greeting }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}"
        "{% endfor %}"
    )
    loaded = _with_template(saved_dir, tmp_path, template)
    messages = [{"role": "user", "content": "富士"}, {"role": "user", "content": "!"}]
    rendered = loaded.apply_chat_template(messages, greeting="hi")
    assert rendered == (
        '[\n {\n  "role": "user",\n  "content": "富士"\n },\n {\n  "role": "user",\n'
        '  "content": "!"\n }\n]|"<&>"|4|hi!'
    )


def test_template_raise_exception_is_sorai_error(spm_dir: Path) -> None:
    loaded = Tokenizer.from_dir(spm_dir)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(SoraiError, match="Conversation roles must alternate"):
        loaded.apply_chat_template(messages)


def test_no_chat_template_is_clear_error(saved_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.chat_template is None
    with pytest.raises(SoraiError, match="has no chat template; use generate without --chat"):
        loaded.encode_chat([{"role": "user", "content": "hi"}])


def test_invalid_template_syntax_is_model_format_error(saved_dir: Path, tmp_path: Path) -> None:
    loaded = _with_template(saved_dir, tmp_path, "{% for m in messages %}")
    with pytest.raises(ModelFormatError, match="not valid Jinja"):
        loaded.apply_chat_template([])


def test_dir_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    with pytest.raises(ModelFormatError, match="tokenizer.json: cannot be read"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config(saved_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelFormatError, match="tokenizer_config.json: not readable JSON"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"tokenizer.ggml.model": "gpt2"}, "no tokenizer.ggml.tokens"),
        (
            {"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]},
            "'rwkv' is not supported",
        ),
        (
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]},
            "no tokenizer.ggml.merges",
        ),
        (
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": ["a", "b"],
                "tokenizer.ggml.token_type": [1],
            },
            "1 entries for 2 tokens",
        ),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, "neither"),
    ],
)
def test_bad_gguf_metadata(metadata: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        Tokenizer.from_gguf_metadata(metadata)
