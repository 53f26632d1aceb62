"""`sorai <verb>`: thin dispatch over the Python API. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import sorai
from sorai import catalog, hub
from sorai.apps.agent import command as agent_command
from sorai.apps.batch import command as batch_command
from sorai.apps.command import say
from sorai.apps.eval import command as eval_command
from sorai.apps.rag import command as index_command
from sorai.apps.skills import command as skills_command
from sorai.apps.text import plural
from sorai.console import command as console_command
from sorai.errors import ContextLengthError, SoraiError
from sorai.model.config import check_chat_model
from sorai.server import model_flags
from sorai.train import command as train_command
from sorai.vision import command as vision_command

EXIT_USAGE = 2

CHAT_HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start over (/system alone clears it)
  /help           this text
  /exit           leave (or Ctrl-D); Ctrl-C stops an answer mid-way"""


def _add_model_args(parser: argparse.ArgumentParser, repeatable: bool = False) -> None:
    default = os.environ.get("SORAI_MODEL", hub.DEFAULT_MODEL)
    parser.add_argument(
        "-m",
        "--model",
        default=None if repeatable else default,
        action="append" if repeatable else "store",
        help="a known model name, a pulled one (sorai ls), hf:ORG/REPO, an HF directory or a "
        f".gguf file (default: {default})"
        + (
            "; repeatable: each one loads beside the first, with its own engine"
            if repeatable
            else ""
        ),
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (default): bfloat16 on a GPU and on a CPU with bf16 dot products "
        "(AVX-512 BF16, AMX), else float32",
    )
    parser.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="auto (default): a GGUF's low-bit weights stay low-bit, a dense checkpoint stays "
        "dense; none: dequantize everything to --dtype; int8/int4: quantize at load",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    # LoRA adapters: served unmerged (--adapter), or one folded into the weights.
    parser.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a LoRA adapter directory in PEFT format (adapter_config.json + "
        "adapter_model.safetensors) served unmerged over --model as NAME (NAME= may be left "
        "out: the directory's name, or its parent's for one named 'adapter'); serve: "
        "repeatable, requests name MODEL+NAME",
    )
    parser.add_argument(
        "--merge-adapter",
        default=None,
        metavar="PATH",
        help="a LoRA adapter directory merged into --model's weights at load (one adapter, "
        "no per-token cost; the model is then named MODEL+NAME)",
    )


def _add_url_args(parser: argparse.ArgumentParser, url_help: str) -> None:
    parser.add_argument("--url", default=None, help=url_help)
    parser.add_argument(
        "--api-key", default=None, help="the server's API key (default: $SORAI_API_KEY)"
    )


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


def parse_adapters(values: Sequence[str] | None) -> dict[str, str]:
    """--adapter NAME=PATH (or PATH) values -> {name: path}; SoraiError on a repeated name."""
    from sorai.model.lora import adapter_name

    adapters: dict[str, str] = {}
    for value in values or []:
        name, eq, path = value.partition("=")
        if not eq or not name or os.sep in name:
            # A registered name (a training run's, a pulled adapter's) serves under that name.
            resolved = hub.resolve_adapter(value)
            name = value if resolved is not value else adapter_name(value)
            path = os.fspath(resolved)
        else:
            path = os.fspath(hub.resolve_adapter(path))
        if name in adapters:
            raise SoraiError(f"--adapter: the name {name!r} is given twice ({value!r})")
        adapters[name] = path
    return adapters


def _lora_bytes(text: str | None) -> int | None:
    """--max-lora-bytes SIZE as bytes (None: not given)."""
    if text is None:
        return None
    from sorai.train.config import parse_bytes

    return parse_bytes(text, "--max-lora-bytes")


def _one_adapter(args: argparse.Namespace) -> str | None:
    """chat / generate run one adapter at most: its name, or None."""
    adapters = parse_adapters(args.adapter)
    if len(adapters) > 1:
        raise SoraiError(
            f"--adapter: chat and generate run one adapter, got {len(adapters)}; "
            "serve several with `sorai serve --adapter NAME=PATH ...`"
        )
    return next(iter(adapters), None)


def _load(args: argparse.Namespace):
    started = time.perf_counter()
    llm = sorai.load(
        args.model,
        dtype=args.dtype,
        progress=say,
        device=args.device,
        adapter=args.merge_adapter,
        quantize=args.quantize,
        adapters=parse_adapters(args.adapter),
    )
    if args.verbose:
        say(f"loaded {llm.name} in {time.perf_counter() - started:.1f}s")
        say(f"running {llm.engine.runtime.line()}")
    return llm


def _print_stats(completion_tokens: int, prompt_tokens: int, seconds: float) -> None:
    rate = completion_tokens / seconds if seconds > 0 else 0.0
    say(
        f"[{plural(prompt_tokens, 'prompt token')}, {completion_tokens} generated in "
        f"{seconds:.2f}s, {rate:.1f} tokens/s]"
    )


def _stream(llm, prompt_ids: list[int], params, verbose: bool) -> str:
    """Print deltas as they come; return the whole text."""
    pieces = []
    count = 0
    started = time.perf_counter()
    for delta in llm.stream_deltas(prompt_ids, params):
        count += len(delta.token_ids)
        if delta.text:
            pieces.append(delta.text)
            print(delta.text, end="", flush=True)
    print(flush=True)
    if verbose:
        _print_stats(count, len(prompt_ids), time.perf_counter() - started)
    return "".join(pieces)


def _url_client(args: argparse.Namespace):
    """The endpoint --url names (sorai serve or any OpenAI-compatible one), talking to --model
    when it serves it, else to the first chat model it lists."""
    from sorai.apps.client import Client, ClientError, first_chat_model

    for flag, value in (("--adapter", args.adapter), ("--merge-adapter", args.merge_adapter)):
        if value is not None:
            raise SoraiError(
                f"{flag} does not apply with --url: the server decides the model "
                "(start it with `sorai serve --adapter NAME=PATH` and name MODEL+NAME)"
            )
    key = args.api_key or os.environ.get("SORAI_API_KEY")
    client = Client.connect(args.url, key, args.model, max_retries=0)
    try:
        served = client.models()
        if client.model not in served:
            client.model = first_chat_model(served, client.where)
    except ClientError:
        client.close()
        raise
    return client


def _print_stream(stream, started: float, verbose: bool) -> str:
    """Print an endpoint's streamed deltas as they come; return the whole text."""
    pieces = []
    with stream:  # leaving early (Ctrl-C) drops the connection, which aborts the request
        for text in stream:
            pieces.append(text)
            print(text, end="", flush=True)
    print(flush=True)
    if verbose and stream.usage is not None:
        usage = stream.usage
        _print_stats(usage.completion_tokens, usage.prompt_tokens, time.perf_counter() - started)
    return "".join(pieces)


def cmd_generate(args: argparse.Namespace) -> int:
    from sorai.engine.params import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams.from_options(_sampling_options(args))  # fail before loading
    if args.url:
        return _generate_at_url(args, prompt, params)
    params = dataclasses.replace(params, adapter=_one_adapter(args))
    llm = _load(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = llm.encode_chat(messages + [{"role": "user", "content": prompt}])
    else:
        ids = llm.encode_prompt(prompt)
    _stream(llm, ids, params, args.verbose)
    return 0


def _generate_at_url(args: argparse.Namespace, prompt: str, params) -> int:
    """`sorai generate --url`: the endpoint's completions (chat completions with --chat)."""
    from sorai.apps.client import request_options

    with _url_client(args) as client:
        started = time.perf_counter()
        options = request_options(params)
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": prompt})
            stream = client.stream_chat(messages, **options)
        else:
            stream = client.stream_completion(prompt, **options)
        _print_stream(stream, started, args.verbose)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from sorai.engine.params import SamplingParams

    params = SamplingParams.from_options(_sampling_options(args))
    with contextlib.ExitStack() as stack:
        if args.url:
            from sorai.apps.client import request_options

            client = stack.enter_context(_url_client(args))
            model = client.model
            options = request_options(params)

            def respond(messages: list[dict[str, str]]) -> str:
                started = time.perf_counter()
                stream = client.stream_chat(messages, **options)
                return _print_stream(stream, started, args.verbose)

        else:
            params = dataclasses.replace(params, adapter=_one_adapter(args))
            llm = _load(args)
            # --model as typed, plus `+<adapter name>` with an adapter
            model = llm.name + (f"+{params.adapter}" if params.adapter else "")

            def respond(messages: list[dict[str, str]]) -> str:
                return _stream(llm, llm.encode_chat(messages), params, args.verbose)

        where = f" at {client.where}" if args.url else ""
        return _chat_loop(respond, args.system, f"{model}{where}")


def _chat_loop(respond, system: str | None, talking_to: str) -> int:
    """The REPL: stdin lines to `respond`, /commands; 0 at end of input or /exit."""
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input()
            import readline  # noqa: F401
        say(f"chatting with {talking_to}; /help for commands, Ctrl-D to leave")
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
                say("(conversation cleared)")
            elif command == "/system":
                system, history = rest.strip() or None, []
                say(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)")
            elif command == "/help":
                say(CHAT_HELP)
            else:
                say(f"unknown command {command}; /help lists them")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": text})
        try:
            answer = respond(messages)
        except KeyboardInterrupt:
            print()
            say("(stopped)")
            continue
        except ContextLengthError as e:
            say(f"error: {e}\n(/reset starts a new conversation)")
            continue
        except SoraiError as e:
            say(f"error: {e}")
            continue
        history += [messages[-1], {"role": "assistant", "content": answer}]


def cmd_serve(args: argparse.Namespace) -> int:
    from sorai.server.auth import APIKeys

    # -m is repeatable: the first model is the server's own, the others load beside it.
    models = list(dict.fromkeys(args.model or [os.environ.get("SORAI_MODEL", hub.DEFAULT_MODEL)]))
    args.model = models[0]
    for extra in models[1:]:
        check_chat_model(extra)
    model_flags.check(args, models)

    # Everything that can be wrong with the flags fails before torch and the model load.
    keys = list(args.api_key or [])
    if not keys and not args.api_key_file and os.environ.get("SORAI_API_KEY"):
        keys = [os.environ["SORAI_API_KEY"]]
    api_keys = APIKeys.from_sources(keys, args.api_key_file or [])
    if not 0 <= args.port <= 65535:
        raise SoraiError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_bytes < 1024:
        raise SoraiError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    timeouts = {
        "--request-timeout": args.request_timeout,
        "--shutdown-timeout": args.shutdown_timeout,
    }
    for flag, value in timeouts.items():
        if value is not None and not 0 < value < math.inf:
            raise SoraiError(f"{flag} must be a number of seconds > 0, got {value:g}")
    check_chat_model(args.model)  # a mistyped name or an embedding model (name or path)
    console = console_command.extension(args)  # the web console's flags, checked now
    media = vision_command.media_policy(args)
    adapters = parse_adapters(args.adapter)
    adapter_dir = None
    if args.adapter_dir is not None:
        adapter_dir = Path(args.adapter_dir).expanduser()
        if not adapter_dir.is_dir():
            raise SoraiError(f"--adapter-dir {args.adapter_dir}: no such directory")
    embedding_model = args.embedding_model
    if embedding_model.strip().lower() == "none":
        embedding_model = None

    # Imported here: the server stack is only needed by this verb.
    from sorai.engine.async_engine import AsyncEngine
    from sorai.engine.config import DEFAULT_KV_CACHE_GIB, EngineConfig
    from sorai.engine.embeddings import check_embedding_model
    from sorai.server.serve import bind, serve
    from sorai.server.state import ServerSettings

    if embedding_model is not None:
        check_embedding_model(embedding_model)  # before the chat model loads; pulls nothing
    # Bound now and held while the model loads: a port in use fails here, and nothing can
    # take the port in the meantime.
    sock = bind(args.host, args.port)

    engine_options = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
        "enable_prefix_caching": False if args.no_prefix_caching else None,
        "kv_cache_gib": args.kv_cache_gib,
        "kv_cache_dtype": args.kv_cache_dtype,
        "cpu_threads": args.cpu_threads,
        "max_loras": args.max_loras,
        "max_lora_rank": args.max_lora_rank,
        "max_lora_bytes": _lora_bytes(args.max_lora_bytes),
    }
    config = EngineConfig(**{k: v for k, v in engine_options.items() if v is not None})

    def load(name: str) -> AsyncEngine:
        return AsyncEngine.from_model(
            name, dtype=args.dtype, device=args.device, config=config, quantize=args.quantize
        )

    kv_gib = config.kv_cache_gib or DEFAULT_KV_CACHE_GIB  # the most a model's cache takes
    pool = model_flags.pool(args, models, load, int(kv_gib * 2**30))
    started = time.perf_counter()
    engine = AsyncEngine.from_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        config=config,
        adapter=args.merge_adapter,
        quantize=args.quantize,
        adapters=adapters,
    )
    say(f"loaded {engine.model_name} in {time.perf_counter() - started:.1f}s")
    for name in models[1:]:
        started = time.perf_counter()
        pool.add(name, load(name))
        say(f"loaded {name} in {time.perf_counter() - started:.1f}s")
    say(f"running {engine.runtime.line()}")
    say(f"OpenMP: {sorai.openmp.describe()}")
    say(f"KV cache: {engine.engine.cache.describe()} (--kv-cache-gib, --kv-cache-dtype)")
    settings = ServerSettings(
        models=pool,  # the -m models after the first, and those loaded on demand
        # The engine's name is --model as typed: what a client of `sorai serve --model X` will
        # naturally send back. With --merge-adapter it is `X+<adapter name>`, so a client asking for
        # the plain base model gets a 404 rather than the fine-tune.
        served_model_names=tuple(args.served_model_name or [engine.model_name]),
        api_keys=api_keys,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        request_timeout=args.request_timeout,
        embedding_model=embedding_model,
        embedding_device=args.device,
        media=media,
        adapter_dir=adapter_dir,
        data_dir=args.data_dir,  # stored responses, files, batches
    )
    for name in adapters:
        say(f"adapter: {engine.model_name}+{name} (unmerged)")
    if api_keys.enabled:
        say(f"API keys required ({len(api_keys)} configured)")
    if embedding_model is not None:
        say(f"embeddings: {embedding_model} (loaded on the first /v1/embeddings request)")
    if pool is not None:
        loadable = pool.max_models - len(models)
        say(
            f"models: {', '.join(models)}"
            + (f"; up to {loadable} more loaded on demand from the cache" if loadable else "")
        )
    return serve(
        engine,
        settings,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        sock=sock,
        extend=_with_hosted_tools(console),
    )


def _with_hosted_tools(console: Any) -> Any:
    """The app's extension: the Responses API's hosted tools, then the console (if any)."""

    def extend(app: Any) -> object:
        from sorai import hosted_tools

        hosted_tools.install(app)
        return console(app) if console is not None else app

    return extend


def cmd_pull(args: argparse.Namespace) -> int:
    path = hub.pull_model(args.name, file=args.file, progress=say, force=args.force)
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = [("NAME", "KIND", "SIZE", "STATUS", "DESCRIPTION")]
    for entry in hub.list_models():
        status = str(entry.path) if entry.path else "not pulled (sorai pull " + entry.name + ")"
        size = f"{entry.size / 1e6:.0f} MB"
        rows.append((entry.name, entry.kind, size, status, entry.description))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join(cells) + "  " + row[4])
    print(f"\ncache: {hub.sorai_home()} (set SORAI_HOME to move it)")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse's parser that names the options close to a mistyped one ("did you mean
    --temperature?"). Every verb's parser is one too: add_parser makes its parent's class."""

    given: list[str] = []  # the arguments this parser was last asked to parse

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        unknown = self.unknown_options()
        if unknown and not message.startswith("unrecognized arguments"):
            message += f"; unrecognized arguments: {' '.join(unknown)}"
        # Matched without the dashes every option shares: "--bogus" is not close to "--verbose".
        options = {option[2:]: option for option in self.long_options()}
        close = {u: difflib.get_close_matches(u[2:], options, n=1) for u in unknown}
        hints = [(u, options[found[0]]) for u, found in close.items() if found]
        if len(hints) == 1:
            message += f" (did you mean {hints[0][1]}?)"
        elif hints:
            message += f" (did you mean {', '.join(f'{m} for {u}' for u, m in hints)}?)"
        super().error(message)

    def long_options(self) -> list[str]:
        return [option for option in self._option_string_actions if option.startswith("--")]

    def unknown_options(self) -> list[str]:
        """The --options among this parser's arguments that none of its options takes (an
        abbreviation argparse accepts, like --temp, is not one)."""
        has_verbs = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        unknown = []
        for arg in self.given:
            if arg == "--" or (has_verbs and not arg.startswith("-")):
                break  # what follows is positional, or the next verb's to parse
            name = arg.partition("=")[0]
            if not name.startswith("--") or name in self._option_string_actions:
                continue
            if not (self.allow_abbrev and any(o.startswith(name) for o in self.long_options())):
                unknown.append(name)
        return unknown


def _chosen_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The parser of the innermost verb the arguments chose (`sorai index add` -> add's)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None))
            if chosen is not None:
                return _chosen_parser(chosen, args)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sorai", description="sorai: fine-tune, serve and use open LLMs on your own machines."
    )
    parser.add_argument("--version", action="version", version=f"sorai {sorai.__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>")

    chat = verbs.add_parser("chat", help="talk to a model in the terminal")
    _add_model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("-v", "--verbose", action="store_true", help="print speed after answers")
    _add_url_args(chat, "talk to a running server (e.g. http://127.0.0.1:8000)")
    _add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(run=cmd_chat)

    generate = verbs.add_parser("generate", help="complete one prompt and print the result")
    generate.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    _add_model_args(generate)
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template")
    generate.add_argument("--system", default=None, help="system prompt (with --chat)")
    generate.add_argument("-v", "--verbose", action="store_true", help="print speed at the end")
    _add_url_args(
        generate,
        "complete at a running server (e.g. http://127.0.0.1:8000): its completions endpoint, "
        "chat completions with --chat",
    )
    _add_sampling_args(generate, max_tokens=256)
    generate.set_defaults(run=cmd_generate)

    serve = verbs.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    _add_model_args(serve, repeatable=True)
    model_flags.add(serve)
    serve.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: 8000)")
    serve.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="name clients use as `model` (repeatable; default: the --model argument; with "
        "--merge-adapter, MODEL+NAME, NAME being the adapter directory's name, or its parent's for "
        "one named 'adapter')",
    )
    serve.add_argument(
        "--embedding-model",
        default=os.environ.get("SORAI_EMBEDDING_MODEL", hub.DEFAULT_EMBEDDING_MODEL),
        metavar="NAME_OR_PATH",
        help="what POST /v1/embeddings serves: a known embedding model or a "
        "sentence-transformers directory, loaded on the first request; 'none' serves none "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require this key as 'Authorization: Bearer KEY' (repeatable; default: "
        "$SORAI_API_KEY, else no key needed)",
    )
    serve.add_argument(
        "--api-key-file",
        action="append",
        default=None,
        metavar="FILE",
        help="a file of accepted keys, one per line (repeatable)",
    )
    serve.add_argument("--max-num-seqs", type=int, default=None, help="batch size (default: 32)")
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per forward pass (default: 512)",
    )
    serve.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    serve.add_argument(
        "--no-prefix-caching", action="store_true", help="do not reuse KV of shared prefixes"
    )
    serve.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="memory for the KV cache (default: one whole context window, at most 1 GiB)",
    )
    serve.add_argument(
        "--kv-cache-dtype",
        default=None,
        metavar="{auto,float32,float16,bfloat16}",
        help="how the KV cache stores keys and values; attention computes in the model's dtype "
        "(default auto: the model's dtype; float16 halves a float32 model's cache)",
    )
    serve.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch threads for decode steps on the CPU (default: one less than the cores, "
        "at least 1; steps with 64+ prompt tokens use every core)",
    )
    # LoRA adapters served unmerged (docs/serving.md, Adapters).
    serve.add_argument(
        "--adapter-dir",
        default=None,
        metavar="DIR",
        help="serve every PEFT adapter under DIR as MODEL+NAME, picked up when it appears",
    )
    serve.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="adapters resident at once; idle ones are evicted, least recently used first "
        "(default: 8)",
    )
    serve.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="largest adapter rank served (default: 16)",
    )
    serve.add_argument(
        "--max-lora-bytes",
        default=None,
        metavar="SIZE",
        help="memory the resident adapters may take (float32, rank padded to --max-lora-rank), "
        "e.g. 512MiB or 2GiB; idle ones are evicted, least recently used first, to make room "
        "(default: no limit beyond --max-loras)",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where stored responses, uploaded files and batches are kept "
        "(default: $SORAI_HOME/server)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request body accepted (default: 4 MiB)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop a request that runs longer (queueing included) with a clear error, "
        "freeing its memory (default: no limit)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long running requests may finish before they end with an "
        "error (default: %(default)s)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    console_command.add_serve_args(serve)
    vision_command.add_media_args(serve)
    serve.set_defaults(run=cmd_serve)

    pull = verbs.add_parser(
        "pull", help="fetch a known model or a Hugging Face repository (hf:ORG/REPO) into the cache"
    )
    pull.add_argument(
        "name",
        nargs="?",
        default=hub.DEFAULT_MODEL,
        help="a known model, or hf:ORG/REPO[@REVISION] (safetensors) or hf:ORG/REPO/FILE.gguf "
        "(default: %(default)s)",
    )
    pull.add_argument("--file", default=None, help="the .gguf file of an hf: repository to fetch")
    pull.add_argument("--force", action="store_true", help="fetch again even if cached")
    pull.set_defaults(run=cmd_pull)

    models = verbs.add_parser("models", help="list known and cached models")
    models.set_defaults(run=cmd_models)

    catalog.add_parsers(verbs)  # ls, show, rm

    train = train_command.add_parser(verbs)
    train.set_defaults(run=train_command.run)

    index = index_command.add_parser(verbs)
    index.set_defaults(run=index_command.run)

    skills_command.add_parsers(verbs)
    agent_command.add_parser(verbs)
    eval_command.add_parser(verbs)
    vision_command.add_parsers(verbs)
    _add_quantize_parser(verbs)
    batch_command.add_parser(verbs)  # sorai batch submit|status|cancel|results
    return parser


# --- sorai quantize ---------------------------------------------------------------------------
def _add_quantize_parser(verbs) -> None:
    # The choices are checked by sorai.model.quant.export (its error names them), which
    # imports torch: not at every start of the CLI.
    quantize = verbs.add_parser(
        "quantize",
        help="write a model with low-bit weights (a GGUF llama.cpp runs, or safetensors)",
    )
    quantize.add_argument("model", help="a known model name, an HF directory or a .gguf file")
    quantize.add_argument(
        "--to",
        required=True,
        help="int4 or int8: the layers --quantize builds (stored as Q4_1/Q8_0); q4_0, q4_1 "
        "or q8_0: llama.cpp's formats, quantized as llama.cpp does",
    )
    quantize.add_argument(
        "--format",
        default=None,
        help="gguf, or safetensors in sorai's low-bit layout (default: gguf when -o ends "
        "in .gguf, else safetensors)",
    )
    quantize.add_argument("-o", "--output", required=True, type=Path, help="file or directory")
    quantize.set_defaults(run=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from sorai.model.quant.export import quantize_model

    source = hub.resolve(args.model, progress=say)
    quantize_model(source, args.to, args.output, args.format, progress=say)
    return 0


# --- end sorai quantize -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # parse_args would report an argument no verb takes with the top-level usage; the verb
    # that was given reports it instead, with its own usage and the options close to it.
    args, extra = parser.parse_known_args(argv)
    if extra:
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
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
