"""`sorai <verb>`: thin dispatch over the Python API. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import sorai
from sorai import hub
from sorai.errors import ContextLengthError, SoraiError

EXIT_USAGE = 2

CHAT_HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start over (/system alone clears it)
  /help           this text
  /exit           leave (or Ctrl-D); Ctrl-C stops an answer mid-way"""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m",
        "--model",
        default=os.environ.get("SORAI_MODEL", hub.DEFAULT_MODEL),
        help="a known model name, an HF directory or a .gguf file (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on a GPU, float32 on the CPU",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
    # The API's defaults are OpenAI's (temperature 1, top_p 1); at the terminal, as in Ollama,
    # a little less randomness reads much better, small models most of all.
    group.add_argument(
        "-t", "--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)"
    )
    group.add_argument("--top-p", type=float, default=0.9, help="(default: %(default)s)")
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--min-p", type=float, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--presence-penalty", type=float, default=None)
    group.add_argument("--frequency-penalty", type=float, default=None)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--min-tokens", type=int, default=None)
    group.add_argument(
        "--ignore-eos", action="store_true", default=None, help="keep going past end-of-text"
    )


SAMPLING_FLAGS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "min_tokens",
    "ignore_eos",
)


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in SAMPLING_FLAGS}


def _load(args: argparse.Namespace):
    started = time.perf_counter()
    llm = sorai.load(args.model, dtype=args.dtype, progress=_say, device=args.device)
    if args.verbose:
        where = f"{llm.model.dtype}".removeprefix("torch.") + f" on {llm.model.device}"
        _say(f"loaded {args.model} ({where}) in {time.perf_counter() - started:.1f}s")
    return llm


def _print_stats(completion_tokens: int, prompt_tokens: int, seconds: float) -> None:
    rate = completion_tokens / seconds if seconds > 0 else 0.0
    _say(
        f"[{prompt_tokens} prompt tokens, {completion_tokens} generated in {seconds:.2f}s, "
        f"{rate:.1f} tokens/s]"
    )


def _stream(llm, prompt_ids: list[int], params, verbose: bool) -> str:
    """Print deltas as they come; return the whole text."""
    pieces = []
    count = 0
    started = time.perf_counter()
    for delta in llm.stream_deltas(prompt_ids, params):
        count += delta.token_id is not None
        if delta.text:
            pieces.append(delta.text)
            print(delta.text, end="", flush=True)
    print(flush=True)
    if verbose:
        _print_stats(count, len(prompt_ids), time.perf_counter() - started)
    return "".join(pieces)


def cmd_generate(args: argparse.Namespace) -> int:
    from sorai.sampling import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams.from_options(_sampling_options(args))  # fail before loading
    llm = _load(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = llm.tokenizer.encode_chat(messages + [{"role": "user", "content": prompt}])
    else:
        ids = llm.encode_prompt(prompt)
    _stream(llm, ids, params, args.verbose)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from sorai.sampling import SamplingParams

    params = SamplingParams.from_options(_sampling_options(args))
    llm = _load(args)
    system = args.system
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input()
            import readline  # noqa: F401
        _say(f"chatting with {args.model}; /help for commands, Ctrl-D to leave")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return 0
            if command == "/reset":
                history = []
                _say("(conversation cleared)")
            elif command == "/system":
                system, history = rest.strip() or None, []
                _say(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)")
            elif command == "/help":
                _say(CHAT_HELP)
            else:
                _say(f"unknown command {command}; /help lists them")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": text})
        try:
            ids = llm.tokenizer.encode_chat(messages)
            answer = _stream(llm, ids, params, args.verbose)
        except KeyboardInterrupt:
            print()
            _say("(stopped)")
            continue
        except ContextLengthError as e:
            _say(f"error: {e}\n(/reset starts a new conversation)")
            continue
        except SoraiError as e:
            _say(f"error: {e}")
            continue
        history += [messages[-1], {"role": "assistant", "content": answer}]


def cmd_pull(args: argparse.Namespace) -> int:
    path = hub.pull(args.name, progress=_say, force=args.force)
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = [("NAME", "SIZE", "STATUS", "DESCRIPTION")]
    for entry in hub.list_models():
        status = str(entry.path) if entry.path else "not pulled (sorai pull " + entry.name + ")"
        rows.append((entry.name, f"{entry.size / 1e6:.0f} MB", status, entry.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join(cells) + "  " + row[3])
    print(f"\ncache: {hub.sorai_home()} (set SORAI_HOME to move it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sorai", description="sorai: fine-tune, serve and use open LLMs on your own machines."
    )
    parser.add_argument("--version", action="version", version=f"sorai {sorai.__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>")

    chat = verbs.add_parser("chat", help="talk to a model in the terminal")
    _add_model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("-v", "--verbose", action="store_true", help="print speed after answers")
    _add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(run=cmd_chat)

    generate = verbs.add_parser("generate", help="complete one prompt and print the result")
    generate.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    _add_model_args(generate)
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template")
    generate.add_argument("--system", default=None, help="system prompt (with --chat)")
    generate.add_argument("-v", "--verbose", action="store_true", help="print speed at the end")
    _add_sampling_args(generate, max_tokens=256)
    generate.set_defaults(run=cmd_generate)

    pull = verbs.add_parser("pull", help="fetch a known model into the cache")
    pull.add_argument("name", nargs="?", default=hub.DEFAULT_MODEL)
    pull.add_argument("--force", action="store_true", help="fetch again even if cached")
    pull.set_defaults(run=cmd_pull)

    models = verbs.add_parser("models", help="list known and cached models")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.run(args)
    except SoraiError as e:
        print(f"sorai: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `sorai generate ... | head` closed the pipe: not an error worth a traceback.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
