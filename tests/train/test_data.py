"""Training data: formats, loss masks, length limits, packing boundaries, errors with file:line,
and a batch order that is deterministic, shardable and resumable. Uses the default model's real
tokenizer (read from the GGUF metadata, without loading the weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sorai.errors import DataError, SoraiError
from sorai.model.gguf import GGUFFile
from sorai.model.tokenizer import Tokenizer
from sorai.train.data import (
    IGNORE_INDEX,
    BatchLoader,
    Example,
    block_causal_mask,
    collate,
    load_dataset,
    load_examples,
    pack,
    read_records,
    split_records,
    tokenize,
)


@pytest.fixture(scope="module")
def tok(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(default_gguf).metadata)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


def one(tmp_path: Path, tok: Tokenizer, obj: dict, **kwargs) -> Example:
    records = read_records(write_jsonl(tmp_path / "one.jsonl", [obj]))
    return tokenize(records[0], tok, **kwargs)


def trained(example: Example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


def spans(example: Example) -> list[list[int]]:
    """Runs of consecutive target tokens."""
    runs, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


# ---------------------------------------------------------------------------------------------
# Loss masking


def test_prompt_completion_masks_the_prompt(tmp_path: Path, tok: Tokenizer) -> None:
    ex = one(tmp_path, tok, {"prompt": "What is 2+2?", "completion": " 4"})
    prompt = tok.encode("What is 2+2?", add_special_tokens=True)
    completion = tok.encode(" 4") + [tok.eos_token_ids[0]]
    assert ex.input_ids == prompt + completion
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex.labels[len(prompt) :] == completion
    full = one(tmp_path, tok, {"prompt": "What is 2+2?", "completion": " 4"}, train_on_prompt=True)
    assert full.labels == full.input_ids


def test_chat_trains_on_the_assistant_reply_and_its_end_of_turn(
    tmp_path: Path, tok: Tokenizer
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ex = one(tmp_path, tok, {"messages": messages})
    assert ex.input_ids == tok.encode_chat(messages, add_generation_prompt=False)
    prompt = tok.encode_chat(messages[:2], add_generation_prompt=True)
    assert ex.input_ids[: len(prompt)] == prompt
    assert all(t == IGNORE_INDEX for t in ex.labels[: len(prompt)])
    reply = tok.encode("Paris.") + [tok.token_to_id("<|im_end|>")]
    assert trained(ex) == reply
    assert ex.labels[len(prompt) : len(prompt) + len(reply)] == reply
    assert tok.decode(trained(ex)) == "Paris.<|im_end|>"


def test_multi_turn_chat_trains_on_every_assistant_turn_only(
    tmp_path: Path, tok: Tokenizer
) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say 日本語"},
        {"role": "assistant", "content": "日本語"},
    ]
    ex = one(tmp_path, tok, {"messages": messages})
    assert [tok.decode(s) for s in spans(ex)] == [
        "Hello! How can I help?<|im_end|>",
        "日本語<|im_end|>",
    ]
    everything = one(tmp_path, tok, {"messages": messages}, train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_assistant_weight_zero_is_not_trained(tmp_path: Path, tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bad answer", "weight": 0},
        {"role": "user", "content": "Try again"},
        {"role": "assistant", "content": "Good answer", "weight": 1},
    ]
    ex = one(tmp_path, tok, {"messages": messages})
    assert [tok.decode(s) for s in spans(ex)] == ["Good answer<|im_end|>"]
    # weight 0 stays masked even when training on the prompt
    everything = one(tmp_path, tok, {"messages": messages}, train_on_prompt=True)
    assert "Bad answer" not in tok.decode(trained(everything))


def test_chat_with_tools_and_a_tool_call_message(tmp_path: Path, tok: Tokenizer) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Use "}, {"type": "text", "text": "f"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    ex = one(tmp_path, tok, {"messages": messages, "tools": tools})
    # Content parts are joined with a newline, as the server joins them.
    assert "<|im_start|>user\nUse \nf<|im_end|>" in tok.decode(ex.input_ids)
    assert tok.decode(spans(ex)[-1]) == "It is 42.<|im_end|>"
    assert "42<|im_end|>" not in tok.decode(spans(ex)[0])  # the tool result is not trained
    # The template knows no tools: the call is trained in the fallback format it is served in.
    assert [tok.decode(s) for s in spans(ex)] == [
        '{"name": "f", "arguments": {}}<|im_end|>',
        "It is 42.<|im_end|>",
    ]
    assert "<|im_start|>user\nResult of f (call c1): 42<|im_end|>" in tok.decode(ex.input_ids)


def test_an_assistant_turn_of_only_tool_calls_is_trained(tmp_path: Path, tok: Tokenizer) -> None:
    calls = [
        {
            "id": f"c{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        for i, city in enumerate(["Paris", "東京"])
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    ex = one(tmp_path, tok, {"messages": messages, "tools": tools})
    assert [tok.decode(s) for s in spans(ex)] == [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '{"name": "get_weather", "arguments": {"city": "東京"}}<|im_end|>'
    ]
    examples, stats = load_examples(read_records(tmp_path / "one.jsonl"), tok, max_length=4096)
    assert len(examples) == 1 and stats.trained_tokens == len(spans(ex)[0])
    # Without tools offered the calls are rendered the same way (the server does that too).
    bare = one(tmp_path, tok, {"messages": messages})
    assert [tok.decode(s) for s in spans(bare)] == [tok.decode(s) for s in spans(ex)]


def test_alpaca_is_rendered_as_a_chat(tmp_path: Path, tok: Tokenizer) -> None:
    rec = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    ex = one(tmp_path, tok, rec)
    messages = [
        {"role": "user", "content": "Translate to French.\n\ncat"},
        {"role": "assistant", "content": "chat"},
    ]
    assert ex.input_ids == tok.encode_chat(messages, add_generation_prompt=False)
    assert tok.decode(trained(ex)) == "chat<|im_end|>"
    no_input = one(tmp_path, tok, {"instruction": "Say hi.", "output": "hi"})
    assert "Say hi.<|im_end|>" in tok.decode(no_input.input_ids)


def test_alpaca_without_a_chat_template_uses_the_alpaca_prompt(
    tmp_path: Path, tok: Tokenizer
) -> None:
    plain = Tokenizer(tok.backend, name="base", special_tokens={"eos_token": "<|endoftext|>"})
    ex = one(tmp_path, plain, {"instruction": "Say hi.", "input": "", "output": "hi"})
    text = plain.decode(ex.input_ids)
    assert text.startswith("Below is an instruction that describes a task. Write a response")
    assert text.endswith("### Instruction:\nSay hi.\n\n### Response:\nhi<|endoftext|>")
    assert plain.decode(trained(ex)) == "hi<|endoftext|>"


def test_text_trains_on_everything_and_ends_with_eos(tmp_path: Path, tok: Tokenizer) -> None:
    ex = one(tmp_path, tok, {"text": "Once upon a time"})
    assert ex.input_ids == tok.encode("Once upon a time") + [tok.eos_token_ids[0]]
    assert ex.labels == ex.input_ids


def test_template_that_is_not_prefix_stable_is_an_error(tmp_path: Path, tok: Tokenizer) -> None:
    # Renders only the last message: earlier turns vanish, so prefixes do not line up.
    template = "{{ messages[-1]['content'] }}"
    odd = Tokenizer(tok.backend, name="odd", chat_templates={"default": template})
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    with pytest.raises(DataError, match=r"c\.jsonl:1: .*not prefix-stable"):
        tokenize(read_records(path)[0], odd)


# ---------------------------------------------------------------------------------------------
# Length limits and statistics


def test_truncate_keeps_the_head_and_drop_drops(tmp_path: Path, tok: Tokenizer) -> None:
    long = " ".join(["word"] * 50)
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"text": "short one"}, {"text": long}, {"text": long}]
    )
    records = read_records(path)
    full = tokenize(records[1], tok)
    examples, stats = load_examples(records, tok, max_length=10, overflow="truncate")
    assert [len(e) for e in examples] == [len(tokenize(records[0], tok)), 10, 10]
    assert examples[1].input_ids == full.input_ids[:10]
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 2, 0)
    assert stats.tokens == sum(len(e) for e in examples)
    examples, stats = load_examples(records, tok, max_length=10, overflow="drop")
    assert len(examples) == 1
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 0, 2)
    assert "2 dropped" in str(stats)


def test_truncation_that_leaves_no_target_drops_the_example(tmp_path: Path, tok: Tokenizer) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "a long prompt " * 20, "completion": "x"}, {"prompt": "q", "completion": "a"}],
    )
    examples, stats = load_examples(read_records(path), tok, max_length=8)
    assert len(examples) == 1 and (stats.truncated, stats.dropped) == (1, 1)
    assert stats.trained_tokens == len(tok.encode("a")) + 1


# ---------------------------------------------------------------------------------------------
# Errors name file:line


GOOD_CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object, got list"),
        ({"foo": 1}, r"bad\.jsonl:2: unknown format \(keys \['foo'\]\)"),
        ({"text": "x"}, r"bad\.jsonl:2: a text record in a file of chat records \(line 1\)"),
        ({"messages": []}, r"bad\.jsonl:2: 'messages' must be a non-empty list"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            r"bad\.jsonl:2: messages\[0\]\.role must be one of",
        ),
        (
            {"messages": [{"role": "user", "content": 3}]},
            r"bad\.jsonl:2: messages\[0\]\.content must be a string",
        ),
        ({"messages": [{"role": "user"}]}, r"bad\.jsonl:2: messages\[0\] has no 'content'"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"bad\.jsonl:2: no assistant message"),
        (
            {"messages": [{"role": "assistant", "content": "x"}]},
            r"bad\.jsonl:2: messages\[0\] is an assistant message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 2},
                ]
            },
            r"bad\.jsonl:2: messages\[1\]\.weight must be 0 or 1",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "weight": 0}]},
            r"bad\.jsonl:2: messages\[0\]\.weight is only allowed on assistant",
        ),
        (
            {"messages": [*GOOD_CHAT["messages"], {"role": "tool", "content": "42"}]},
            r"bad\.jsonl:2: messages\.2: a tool message needs 'tool_call_id'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                ]
            },
            r"bad\.jsonl:2: messages\.1\.tool_calls\.0 must be",
        ),
        (
            {**GOOD_CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            r"bad\.jsonl:2: tools\.0\.function\.name must be",
        ),
    ],
)
def test_bad_chat_line_names_file_and_line(tmp_path: Path, line, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_CHAT, line])
    with pytest.raises(DataError, match=message) as info:
        read_records(path)
    assert isinstance(info.value, SoraiError) and isinstance(info.value, ValueError)


PC = {"prompt": "p", "completion": "c"}
ALPACA = {"instruction": "i", "output": "o"}


@pytest.mark.parametrize(
    ("head", "line", "fmt", "message"),
    [
        (PC, {"prompt": "p", "completion": 5}, None, r"x\.jsonl:3: 'completion' must be a string"),
        (ALPACA, {"instruction": "i", "output": None}, None, r"x\.jsonl:3: missing key 'output'"),
        (ALPACA, {"instruction": "i", "input": 1, "output": "o"}, None, r"x\.jsonl:3: 'input'"),
        ({"text": "t"}, {"text": ""}, None, r"x\.jsonl:3: 'text' is empty"),
        (PC, {"prompt": "p"}, "prompt_completion", r"x\.jsonl:3: missing key 'completion'"),
        (GOOD_CHAT, {"text": "t"}, "chat", r"x\.jsonl:3: missing key 'messages' \(format chat\)"),
    ],
)
def test_bad_line_of_other_formats(tmp_path: Path, head, line, fmt, message: str) -> None:
    # line 1 valid, line 2 blank (skipped but counted), line 3 bad
    path = write_jsonl(tmp_path / "x.jsonl", [head, "", line])
    with pytest.raises(DataError, match=message):
        read_records(path, fmt)


def test_empty_file_unknown_format_and_undecodable_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty data file"):
        read_records(empty)
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        read_records(empty, "csv")  # type: ignore[arg-type]
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"raw\.jsonl:2: not UTF-8"):
        read_records(raw)
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read"):
        read_records(tmp_path / "missing.jsonl")


def test_template_rejection_names_the_line(tmp_path: Path, tok: Tokenizer) -> None:
    strict = Tokenizer(
        tok.backend,
        name="strict",
        chat_templates={"default": "{{ raise_exception('roles must alternate') }}"},
    )
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT])
    with pytest.raises(DataError, match=r"c\.jsonl:1: .*roles must alternate"):
        tokenize(read_records(path)[0], strict)


# ---------------------------------------------------------------------------------------------
# Packing


def doc(start: int, n: int, trained_from: int = 0) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE_INDEX] * trained_from + ids[trained_from:])


def test_packing_restarts_positions_and_never_targets_across_documents() -> None:
    docs = [doc(100, 5, trained_from=2), doc(200, 4), doc(300, 6), doc(400, 3)]
    (batch,) = pack(docs, seq_len=10, batch_size=2)
    assert batch.input_ids.shape == (2, 10)
    # first fit: row 0 = docs 0 + 1 (9 tokens), row 1 = doc 2 + doc 3 (9 tokens)
    assert batch.document_ids.tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 1, 1, -1],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, -1],
    ]
    assert batch.position_ids.tolist()[0] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert batch.input_ids.tolist()[0][:9] == [100, 101, 102, 103, 104, 200, 201, 202, 203]
    # labels are pre-shifted: labels[t] is the target of logits[t] within the same document;
    # the last token of each document (t=4, t=8) predicts nothing.
    i = IGNORE_INDEX
    assert batch.labels.tolist()[0] == [i, 102, 103, 104, i, 201, 202, 203, i, i]
    assert batch.num_targets == 3 + 3 + 5 + 2
    for b in range(2):
        for t in range(9):
            if batch.labels[b, t] != i:
                assert batch.document_ids[b, t] == batch.document_ids[b, t + 1]
                assert batch.labels[b, t] == batch.input_ids[b, t + 1]


def test_block_causal_mask_is_block_diagonal_and_causal() -> None:
    batch = collate([[doc(0, 3), doc(10, 2)]], seq_len=6)
    mask = block_causal_mask(batch.document_ids)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],  # padding sees only itself: no empty softmax row
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(batch.attention_mask(), mask)


def test_packing_keeps_every_token_once() -> None:
    lengths = [7, 3, 9, 1, 5, 8, 2, 6, 4, 10, 3, 3]
    docs = [doc(1000 * k, n) for k, n in enumerate(lengths)]
    batches = pack(docs, seq_len=12, batch_size=3)
    ids = torch.cat([b.input_ids[b.document_ids >= 0] for b in batches]).tolist()
    assert sorted(ids) == sorted(t for d in docs for t in d.input_ids)
    rows = sum(b.input_ids.shape[0] for b in batches)
    assert rows <= 8  # 61 tokens in rows of 12: first fit wastes little


def test_padded_batches_are_length_bucketed() -> None:
    docs = [doc(1000 * k, n) for k, n in enumerate([2, 9, 3, 8, 2, 9, 3, 8])]
    loader = BatchLoader(docs, seq_len=16, micro_batch_size=2, pack=False, seed=1)
    widths = []
    for batch in loader:
        widths.append(batch.input_ids.shape[1])
        assert (batch.document_ids.max(dim=1).values == 0).all()  # one document per row
    assert sorted(widths) == [2, 3, 8, 9]  # pairs of equal length: no padding


# ---------------------------------------------------------------------------------------------
# Order, sharding, resume


def tagged(n: int) -> list[Example]:
    # example k has first token 10_000 + k and a length that varies with k
    return [Example([10_000 + k] + [1] * (k % 7), [10_000 + k] + [1] * (k % 7)) for k in range(n)]


def seen(batch) -> list[int]:
    return [t for t in batch.input_ids.flatten().tolist() if t >= 10_000]


@pytest.mark.parametrize("packed", [True, False])
def test_order_is_deterministic_per_seed_and_epoch(packed: bool) -> None:
    def epoch_order(seed: int, epoch: int) -> list[int]:
        loader = BatchLoader(tagged(40), seq_len=16, micro_batch_size=2, pack=packed, seed=seed)
        loader.set_epoch(epoch)
        return [k for b in loader for k in seen(b)]

    assert epoch_order(0, 0) == epoch_order(0, 0)
    assert epoch_order(0, 0) != epoch_order(0, 1)
    assert epoch_order(0, 0) != epoch_order(1, 0)
    assert sorted(epoch_order(3, 2)) == [10_000 + k for k in range(40)]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_covers_every_example_once(packed: bool, world_size: int) -> None:
    examples = tagged(37)
    loaders = [
        BatchLoader(
            examples, seq_len=16, micro_batch_size=2, pack=packed, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]
    per_rank = [list(loader) for loader in loaders]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps everywhere
    assert all(b.input_ids.shape[0] == 2 for batches in per_rank for b in batches)
    everything = [k for batches in per_rank for b in batches for k in seen(b)]
    assert sorted(everything) == [10_000 + k for k in range(37)]
    assert all(loader.epoch == 1 and loader.position == 0 for loader in loaders)


@pytest.mark.parametrize("packed", [True, False])
def test_resume_from_state_dict_continues_with_the_same_batch(packed: bool) -> None:
    def make() -> BatchLoader:
        return BatchLoader(tagged(50), seq_len=16, micro_batch_size=2, pack=packed, seed=7)

    reference = make()
    run = [seen(b) for _ in range(3) for b in reference]  # three epochs
    steps = len(make())
    for cut in (1, steps - 1, steps, steps + 2):
        first = make()
        it = iter(first)
        taken = []
        for _ in range(cut):
            try:
                taken.append(seen(next(it)))
            except StopIteration:
                it = iter(first)
                taken.append(seen(next(it)))
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        resumed = make()
        resumed.load_state_dict(state)
        nxt = next(iter(resumed))
        assert taken == run[:cut]
        assert seen(nxt) == run[cut]
    skipped = make()
    skipped.skip(2)
    assert seen(next(iter(skipped))) == run[2]
    assert skipped.step == 3


def test_resume_with_another_world_size_continues_at_the_same_row() -> None:
    def make(rank: int, world_size: int) -> BatchLoader:
        return BatchLoader(tagged(60), seq_len=8, seed=2, rank=rank, world_size=world_size)

    single = [seen(b) for b in make(0, 1)]
    pair = [make(0, 2), make(1, 2)]
    iters = [iter(loader) for loader in pair]
    first = [seen(next(it)) for _ in range(3) for it in iters]  # 3 steps of 2 ranks
    assert first == single[:6]
    resumed = make(0, 1)
    resumed.load_state_dict(pair[0].state_dict())
    assert [seen(b) for b in resumed] == single[6:]


def test_resume_refuses_other_data_or_seed() -> None:
    state = BatchLoader(tagged(10), seq_len=16).state_dict()
    with pytest.raises(DataError, match="training data changed"):
        BatchLoader(tagged(11), seq_len=16).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        BatchLoader(tagged(10), seq_len=16, seed=1).load_state_dict(state)


def test_loader_rejects_bad_arguments() -> None:
    with pytest.raises(DataError, match="does not fit seq_len 4"):
        BatchLoader(tagged(10), seq_len=4)
    with pytest.raises(DataError, match="rank 2 is not in a world of size 2"):
        BatchLoader(tagged(10), seq_len=16, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# Validation split / file


def test_val_split_is_deterministic_and_disjoint(tmp_path: Path, tok: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {k}"} for k in range(20)])
    records = read_records(path)
    train, val = split_records(records, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert {r.line for r in train}.isdisjoint({r.line for r in val})
    assert [r.line for r in val] == [r.line for r in split_records(records, 0.25, seed=3)[1]]
    assert [r.line for r in val] != [r.line for r in split_records(records, 0.25, seed=4)[1]]
    data = load_dataset(path, tok, max_length=32, val_split=0.25, seed=3)
    assert (len(data.train), len(data.val)) == (15, 5)
    assert data.val_stats is not None and data.val_stats.examples == 5


def test_separate_validation_file(tmp_path: Path, tok: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_CHAT] * 4)
    val = write_jsonl(tmp_path / "val.jsonl", [GOOD_CHAT, "oops"])
    with pytest.raises(DataError, match=r"val\.jsonl:2: not valid JSON"):
        load_dataset(path, tok, max_length=64, val_path=val)
    write_jsonl(val, [GOOD_CHAT])
    data = load_dataset(path, tok, max_length=64, val_path=val)
    assert (len(data.train), len(data.val)) == (4, 1)
    assert data.train_stats.formats == {"chat": 4}
