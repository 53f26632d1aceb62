"""Training data: JSONL records -> token ids with a loss mask -> packed (or padded) batches.

Formats, detected per line from its keys (or forced with `format=`); one format per file:

- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...],
  "tools": [...]?}`` as the OpenAI fine-tuning API takes it. An assistant message may carry
  ``"weight": 0`` (no loss on it) or ``1``, and ``tool_calls`` (its content may then be null); a
  tool message needs its ``tool_call_id``. Rendered by the one chat renderer
  (sorai/model/chat.py) exactly as ``/v1/chat/completions`` renders the same messages and tools:
  the same text, the same token ids (content parts joined with newlines; tool definitions,
  calls and results natively when the chat template knows tools, else in the fallback format,
  so an assistant turn that calls a tool is trained on its calls' text).
- ``prompt_completion``: ``{"prompt": str, "completion": str}``; the prompt is encoded as
  `generate` encodes a prompt (with BOS when the tokenizer adds one), the completion after it,
  then EOS.
- ``alpaca``: ``{"instruction": str, "input": str?, "output": str, "system": str?}``; rendered as
  a chat (system?, user = instruction + blank line + input, assistant = output) through the
  model's chat template, so the fine-tune is served by `/v1/chat/completions` exactly as it was
  trained. A model without a chat template gets the classic Stanford Alpaca prompt
  (`ALPACA_PROMPT`) as a prompt/completion pair instead.
- ``text``: ``{"text": str}`` for continued pretraining; every token is trained, EOS appended.

Loss masking: an `Example`'s ``labels`` line up with its ``input_ids`` -- ``labels[t]`` is
``input_ids[t]`` when token t is a target and `IGNORE_INDEX` (-100) when it is not. By default
only assistant turns (their content and the end-of-turn token closing them) and completions are
targets; ``train_on_prompt=True`` makes every token one (except assistant messages of weight 0).

Label alignment in batches: `Batch.labels` are *already shifted*. ``labels[:, t]`` is the target
of ``logits[:, t]`` (the token at t+1 of the same document), so the trainer computes
``cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` with no shift of its
own. The last token of every document, and padding, have label -100, so in a packed row no
position is ever trained to predict the first token of the next document.

Packing: rows of exactly ``seq_len`` tokens each hold several whole documents;
``position_ids`` restart at 0 for each document and ``document_ids`` (0, 1, ... per row; -1 for
padding) give the block-diagonal causal mask (`block_causal_mask`) so attention never crosses
documents. ``pack=False`` gives length-bucketed, padded batches of one document per row instead.

`BatchLoader` yields the batches of one data-parallel rank: the order is a pure function of
(seed, epoch), rank r of W takes micro-batches r, r+W, ... of every global step, every rank runs
the same number of steps (the last step is filled with all-padding rows when examples run out),
and `state_dict` / `load_state_dict` resume exactly at the next batch.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from sorai.errors import DataError, SoraiError, ToolError
from sorai.model.chat import ToolChoice, check_messages
from sorai.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("chat", "prompt_completion", "alpaca", "text")
ROLES = ("system", "user", "assistant", "tool")

Format = Literal["chat", "prompt_completion", "alpaca", "text"]
Overflow = Literal["truncate", "drop"]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass(frozen=True)
class Record:
    """One JSONL line, checked: `data` holds the fields of `format`, normalized."""

    path: str
    line: int
    format: Format
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Example:
    """One tokenized document. labels[t] == input_ids[t] where token t is a target, else -100."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""  # "path:line" of the record it came from

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class DataStats:
    """What loading a data file did; the trainer logs it (`str(stats)`)."""

    examples: int = 0  # kept (after truncation / dropping)
    tokens: int = 0  # in kept examples
    trained_tokens: int = 0  # tokens that carry loss
    truncated: int = 0  # longer than max_length, head kept
    dropped: int = 0  # longer than max_length and dropped, or left with no trained token
    max_length: int | None = None
    formats: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {f}" for f, n in sorted(self.formats.items())) or "none"
        return (
            f"{self.examples} examples ({kinds}), {self.tokens} tokens, "
            f"{self.trained_tokens} trained; {self.truncated} truncated, {self.dropped} dropped "
            f"(max_length {self.max_length})"
        )


# ---------------------------------------------------------------------------------------------
# Reading and checking JSONL


def detect_format(obj: dict[str, Any]) -> Format | None:
    """The format a record's keys say it is in, or None."""
    if "messages" in obj:
        return "chat"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def _need_str(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if optional:
            return ""
        raise DataError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _check_content(content: Any, where: str, name: str) -> None:
    # OpenAI content is a string or a list of parts; only text parts can be trained on here.
    # The chat renderer joins the parts, as it does for the server.
    if isinstance(content, str):
        return
    if isinstance(content, list):
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise DataError(
                    f'{where}: {name}.content[{j}] must be {{"type": "text", "text": str}}'
                )
        return
    raise DataError(
        f"{where}: {name}.content must be a string or a list of text parts, "
        f"got {type(content).__name__}"
    )


def _check_chat(obj: dict[str, Any], where: str) -> dict[str, Any]:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    out: list[dict[str, Any]] = []
    weights: list[int] = []
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {name} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {name}.role must be one of {', '.join(ROLES)}, got {role!r}")
        clean = {k: v for k, v in message.items() if k != "weight"}
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            pass  # a turn of only calls: the renderer writes the calls
        elif "content" not in message:
            raise DataError(f"{where}: {name} has no 'content'")
        else:
            _check_content(content, where, name)
        weight = message.get("weight", 1)
        if "weight" in message:
            if role != "assistant":
                raise DataError(f"{where}: {name}.weight is only allowed on assistant messages")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise DataError(f"{where}: {name}.weight must be 0 or 1, got {weight!r}")
        out.append(clean)
        weights.append(int(weight))
    if out[0]["role"] == "assistant":
        raise DataError(
            f"{where}: messages[0] is an assistant message; a conversation starts with a "
            "system or user message"
        )
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list, got {type(tools).__name__}")
    try:
        # As the server checks a request: the tools, then the messages, normalised as it
        # normalises them (content parts joined, tool calls and results checked).
        ToolChoice.from_request(tools)
        out = check_messages(out)
    except ToolError as exc:
        raise DataError(f"{where}: {exc}") from None
    return {"messages": out, "weights": weights, "tools": tools}


def _check(obj: dict[str, Any], fmt: Format, where: str) -> dict[str, Any]:
    if fmt == "chat":
        if "messages" not in obj:
            raise DataError(f"{where}: missing key 'messages' (format chat)")
        return _check_chat(obj, where)
    if fmt == "prompt_completion":
        return {
            "prompt": _need_str(obj, "prompt", where),
            "completion": _need_str(obj, "completion", where),
        }
    if fmt == "alpaca":
        return {
            "instruction": _need_str(obj, "instruction", where),
            "input": _need_str(obj, "input", where, optional=True),
            "output": _need_str(obj, "output", where),
            "system": _need_str(obj, "system", where, optional=True),
        }
    text = _need_str(obj, "text", where)
    if not text:
        raise DataError(f"{where}: 'text' is empty")
    return {"text": text}


def read_records(path: str | Path, format: Format | None = None) -> list[Record]:
    """Every record of a JSONL file, checked; blank lines are skipped.

    Raises DataError naming `path:line` for malformed JSON, a non-object line, missing keys,
    wrong types, an unknown or mixed format, or a file with no records.
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror or exc})") from exc
    records: list[Record] = []
    first: Record | None = None
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = line_bytes.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 text ({exc.reason})") from None
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        fmt = format or detect_format(obj)
        if fmt is None:
            raise DataError(
                f"{where}: unknown format (keys {sorted(obj)}); expected 'messages' (chat), "
                "'prompt' + 'completion', 'instruction' + 'output' (alpaca) or 'text'"
            )
        if first is not None and fmt != first.format:
            raise DataError(
                f"{where}: a {fmt} record in a file of {first.format} records (line "
                f"{first.line}); use one format per file"
            )
        record = Record(str(path), number, fmt, _check(obj, fmt, where))
        first = first or record
        records.append(record)
    if not records:
        raise DataError(f"{path}: empty data file (no JSONL records)")
    return records


# ---------------------------------------------------------------------------------------------
# Tokenizing


def _eos_id(tokenizer: Tokenizer) -> int:
    if not tokenizer.eos_token_ids:
        raise DataError(f"model {tokenizer.name}: the tokenizer has no EOS token to end examples")
    return tokenizer.eos_token_ids[0]


def _targets(ids: list[int], mask: list[bool]) -> list[int]:
    return [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def _render(
    tokenizer: Tokenizer, setup: ToolChoice, messages: list[dict], gen: bool, where: str
) -> str:
    try:
        return setup.render(tokenizer, messages, add_generation_prompt=gen)
    except SoraiError as exc:
        raise DataError(f"{where}: {exc}") from exc


def _tokenize_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    weights: Sequence[int],
    tools: list | None,
    train_on_prompt: bool,
    where: str,
) -> Example:
    """Render the whole conversation once, as the server renders a request of these messages
    and `tools` (sorai/model/chat.py); each assistant turn's span is found by rendering the
    conversation up to it (with the generation prompt: the server's prompt for it) and up to its
    end: the character span between them is what the model writes at inference. Tokens starting
    inside the span are targets, up to the last end-of-turn token in it (the newline some
    templates write after <|im_end|> is never generated, so it is not trained). A token that
    straddles the start of the span (BPE merging the prompt's last characters with the reply's
    first) stays masked: the prompt at inference ends before it. Token ids are those of the
    whole rendering, exactly what the model sees; offsets map the character spans onto them."""
    setup = ToolChoice.from_request(tools)
    full = _render(tokenizer, setup, messages, False, where)
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)
    ids, offsets = list(encoding.ids), encoding.offsets
    mask = [train_on_prompt] * len(ids)
    eos = set(tokenizer.eos_token_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, setup, messages[:i], True, where)
        through = _render(tokenizer, setup, messages[: i + 1], False, where)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{where}: the chat template of model {tokenizer.name} is not prefix-stable "
                f"(rendering messages[:{i}] with the generation prompt is not a prefix of "
                f"rendering messages[:{i + 1}], or that of the whole conversation), so "
                f"assistant message {i} cannot be located; use prompt/completion records instead"
            )
        start, end = len(before), len(through)
        span = [t for t, (s, _) in enumerate(offsets) if start <= s < end]
        ends = [t for t in span if ids[t] in eos]
        if ends:
            span = [t for t in span if t <= ends[-1]]
        for t in span:
            mask[t] = bool(weights[i])
    return Example(ids, _targets(ids, mask), where)


def tokenize(record: Record, tokenizer: Tokenizer, *, train_on_prompt: bool = False) -> Example:
    """The record as token ids with labels (-100 where no loss), before any length limit."""
    data, where = record.data, record.where
    if record.format == "chat":
        return _tokenize_chat(
            tokenizer, data["messages"], data["weights"], data["tools"], train_on_prompt, where
        )
    if record.format == "alpaca" and tokenizer.chat_template is not None:
        user = data["instruction"] + (f"\n\n{data['input']}" if data["input"] else "")
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": data["output"]},
        ]
        if data["system"]:
            messages.insert(0, {"role": "system", "content": data["system"]})
        return _tokenize_chat(
            tokenizer, messages, [1] * len(messages), None, train_on_prompt, where
        )
    if record.format == "text":
        ids = tokenizer.encode(data["text"], add_special_tokens=True) + [_eos_id(tokenizer)]
        return Example(ids, list(ids), where)
    if record.format == "alpaca":
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context"
            if data["input"]
            else "",
            instruction=data["instruction"],
            input_block=f"### Input:\n{data['input']}\n\n" if data["input"] else "",
        )
        completion = data["output"]
    else:
        prompt, completion = data["prompt"], data["completion"]
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    completion_ids = tokenizer.encode(completion) + [_eos_id(tokenizer)]
    ids = prompt_ids + completion_ids
    mask = [train_on_prompt] * len(prompt_ids) + [True] * len(completion_ids)
    return Example(ids, _targets(ids, mask), where)


def load_examples(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    overflow: Overflow = "truncate",
    train_on_prompt: bool = False,
) -> tuple[list[Example], DataStats]:
    """Tokenize records and apply the length limit: `truncate` keeps the first `max_length`
    tokens, `drop` leaves the example out. An example left with no target is dropped too."""
    if overflow not in ("truncate", "drop"):
        raise DataError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    stats = DataStats(max_length=max_length)
    examples = []
    for record in records:
        example = tokenize(record, tokenizer, train_on_prompt=train_on_prompt)
        if len(example) > max_length:
            if overflow == "drop":
                stats.dropped += 1
                continue
            example = Example(
                example.input_ids[:max_length], example.labels[:max_length], example.source
            )
            stats.truncated += 1
        # The first token is never a target (nothing precedes it within the document).
        trained = example.num_trained - (example.labels[0] != IGNORE_INDEX)
        if trained == 0:
            stats.dropped += 1
            continue
        examples.append(example)
        stats.examples += 1
        stats.tokens += len(example)
        stats.trained_tokens += trained
        stats.formats[record.format] = stats.formats.get(record.format, 0) + 1
    return examples, stats


def split_records(
    records: Sequence[Record], val_split: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """(train, validation): a `val_split` fraction of the records, chosen by `seed` alone."""
    if not 0 <= val_split < 1:
        raise DataError(f"val_split must be in [0, 1), got {val_split}")
    if val_split == 0:
        return list(records), []
    n_val = max(1, round(len(records) * val_split))
    if n_val >= len(records):
        raise DataError(
            f"val_split {val_split} of {len(records)} records leaves nothing to train on"
        )
    order = list(range(len(records)))
    random.Random(f"sorai-val:{seed}").shuffle(order)
    val = set(order[:n_val])
    return (
        [r for i, r in enumerate(records) if i not in val],
        [r for i, r in enumerate(records) if i in val],
    )


@dataclass
class Dataset:
    train: list[Example]
    val: list[Example]
    train_stats: DataStats
    val_stats: DataStats | None


def load_dataset(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    format: Format | None = None,
    overflow: Overflow = "truncate",
    train_on_prompt: bool = False,
    val_path: str | Path | None = None,
    val_split: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Read, check, split and tokenize the training data (and a validation file or split)."""
    records = read_records(path, format)
    if val_path is not None and val_split:
        raise DataError("give either val_path or val_split, not both")
    val_records = read_records(val_path, format) if val_path is not None else []
    records, split = split_records(records, val_split, seed)
    val_records = val_records or split
    kwargs = {"max_length": max_length, "overflow": overflow, "train_on_prompt": train_on_prompt}
    train, train_stats = load_examples(records, tokenizer, **kwargs)
    if not train:
        raise DataError(f"{path}: no usable example ({train_stats})")
    val, val_stats = load_examples(val_records, tokenizer, **kwargs) if val_records else ([], None)
    log.info("training data %s: %s", path, train_stats)
    if val_stats is not None:
        log.info("validation data %s: %s", val_path or f"{val_split:.0%} of {path}", val_stats)
    return Dataset(train, val, train_stats, val_stats)


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """Token rows for one forward pass. labels are shifted: labels[:, t] is the target of
    logits[:, t], -100 where there is none. document_ids number the documents of each row from
    0 (-1 for padding); position_ids restart at 0 with every document."""

    input_ids: Tensor  # [B, T] long
    labels: Tensor  # [B, T] long
    position_ids: Tensor  # [B, T] long
    document_ids: Tensor  # [B, T] long

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def attention_mask(self) -> Tensor:
        return block_causal_mask(self.document_ids)


def block_causal_mask(document_ids: Tensor) -> Tensor:
    """bool [B, 1, T, T], True where query i may attend to key j: same document and j <= i.
    Padding (-1) attends to earlier padding only, so no row is empty (no NaN in softmax)."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    t = document_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None]


def collate(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int = 0) -> Batch:
    """One Batch of len(rows) rows of seq_len tokens; each row holds its examples back to back,
    then padding. Raises DataError if a row does not fit."""
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.full(shape, -1, dtype=torch.long)
    for b, row in enumerate(rows):
        if sum(len(e) for e in row) > seq_len:
            raise DataError(f"{len(row)} examples do not fit a row of {seq_len} tokens")
        offset = 0
        for d, example in enumerate(row):
            n = len(example)
            end = offset + n
            input_ids[b, offset:end] = torch.tensor(example.input_ids)
            # Shift within the document: the last token has no target here.
            labels[b, offset : end - 1] = torch.tensor(example.labels[1:], dtype=torch.long)
            position_ids[b, offset:end] = torch.arange(n)
            document_ids[b, offset:end] = d
            offset = end
    return Batch(input_ids, labels, position_ids, document_ids)


def pack_rows(lengths: Sequence[int], seq_len: int, open_rows: int = 64) -> list[list[int]]:
    """Group example indices into rows of at most seq_len tokens: first fit, in the given order,
    over the `open_rows` most recent rows that still have room (the fullest is closed when more
    are open). Deterministic; rows come out in the order they were opened."""
    rows: list[list[int]] = []
    room: list[int] = []
    open_: list[int] = []  # indices into rows
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise DataError(f"an example of {n} tokens does not fit seq_len {seq_len}")
        for r in open_:
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
            open_.append(len(rows) - 1)
            if len(open_) > open_rows:
                open_.remove(min(open_, key=lambda r: (room[r], r)))
    return rows


def pack(
    examples: Sequence[Example], seq_len: int, batch_size: int = 1, pad_id: int = 0
) -> list[Batch]:
    """Pack examples (in this order) into batches of `batch_size` rows of exactly seq_len tokens;
    the last batch may have fewer rows."""
    rows = pack_rows([len(e) for e in examples], seq_len)
    return [
        collate([[examples[i] for i in row] for row in rows[s : s + batch_size]], seq_len, pad_id)
        for s in range(0, len(rows), batch_size)
    ]


class BatchLoader:
    """The batches of one data-parallel rank, epoch after epoch, resumable.

    Each epoch is a list of rows (packed documents, or with pack=False single documents in
    length buckets) fixed by (seed, epoch). A global step takes the next
    world_size * micro_batch_size rows; rank r gets rows [r * B, (r + 1) * B) of them, so the
    ranks together see every example exactly once per epoch. The last step is filled with
    all-padding rows (no targets) so every rank runs the same number of steps; the trainer should
    normalize the loss by the number of targets summed over ranks.

    Iterating yields the rest of the current epoch and then moves to the next one.
    state_dict() after a batch resumes at the batch after it, even with a different world_size
    (positions count rows, not steps).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        seq_len: int,
        micro_batch_size: int = 1,
        pack: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
        bucket_steps: int = 64,
    ) -> None:
        if not examples:
            raise DataError("no examples to make batches of")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of size {world_size}")
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        longest = max(len(e) for e in examples)
        if longest > seq_len:
            raise DataError(f"an example of {longest} tokens does not fit seq_len {seq_len}")
        self.examples = list(examples)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.pack = pack
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad_id = pad_id
        self.bucket_steps = bucket_steps
        self.epoch = 0
        self.position = 0  # rows of this epoch already handed out (all ranks together)
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    @property
    def rows_per_step(self) -> int:
        return self.world_size * self.micro_batch_size

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"sorai-data:{self.seed}:{epoch}").shuffle(order)
        return order

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """The rows of an epoch, as lists of example indices."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        order = self._order(epoch)
        if self.pack:
            rows = pack_rows([len(self.examples[i]) for i in order], self.seq_len)
            plan = [[order[i] for i in row] for row in rows]
        else:
            # Sort within chunks of bucket_steps global steps so a step's rows have similar
            # lengths (little padding), then shuffle the steps.
            step = self.rows_per_step
            chunk = step * self.bucket_steps
            rows = []
            for c in range(0, len(order), chunk):
                rows += sorted(order[c : c + chunk], key=lambda i: len(self.examples[i]))
            steps = [rows[s : s + step] for s in range(0, len(rows), step)]
            if self.shuffle:
                random.Random(f"sorai-buckets:{self.seed}:{epoch}").shuffle(steps)
            plan = [[i] for s in steps for i in s]
        self._plan_cache = (epoch, plan)
        return plan

    def __len__(self) -> int:
        """Steps in the current epoch (from its start)."""
        return math.ceil(len(self.plan()) / self.rows_per_step)

    @property
    def step(self) -> int:
        """Steps of the current epoch already taken."""
        return math.ceil(self.position / self.rows_per_step)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def skip(self, steps: int) -> None:
        """Move `steps` global steps ahead within the current epoch (clamped to its end)."""
        self.position = min(len(self.plan()), self.position + steps * self.rows_per_step)

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        while self.position < len(plan):
            start = self.position + self.rank * self.micro_batch_size
            rows = plan[start : start + self.micro_batch_size]
            rows += [[]] * (self.micro_batch_size - len(rows))
            step_rows = plan[self.position : self.position + self.rows_per_step]
            if self.pack:
                seq_len = self.seq_len
            else:
                seq_len = max(len(self.examples[i]) for row in step_rows for i in row)
            self.position += self.rows_per_step
            if self.position >= len(plan):
                self.epoch, self.position = self.epoch + 1, 0
            yield collate([[self.examples[i] for i in row] for row in rows], seq_len, self.pad_id)
            if self.position == 0:
                return

    def _fingerprint(self) -> list[int]:
        return [len(self.examples), sum(len(e) for e in self.examples)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise DataError(
                f"the data state was saved with seed {state.get('seed')}, this loader has seed "
                f"{self.seed}; resume with the same seed"
            )
        if list(state.get("fingerprint", [])) != self._fingerprint():
            raise DataError(
                "the training data changed since the data state was saved "
                f"(examples, tokens: {state.get('fingerprint')} then, {self._fingerprint()} now)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
