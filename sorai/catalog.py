"""`sorai ls`, `sorai show NAME`, `sorai rm NAME`: what the model cache holds (known models
pulled, Hub models, training runs' exports), listed, described and removed by name."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sorai import hf, hub, registry
from sorai.errors import ModelNotFoundError, SoraiError


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    ls = verbs.add_parser("ls", help="list the cached models, adapters and training runs")
    ls.add_argument("--json", action="store_true", help="one JSON object per entry")
    ls.set_defaults(run=cmd_ls)

    show = verbs.add_parser("show", help="describe a cached model or adapter")
    show.add_argument("name", help="a name from `sorai ls` (or a model path)")
    show.add_argument("--template", action="store_true", help="print the whole chat template")
    show.set_defaults(run=cmd_show)

    rm = verbs.add_parser("rm", help="remove a model or adapter from the cache")
    rm.add_argument("name", nargs="+", help="names from `sorai ls`")
    rm.add_argument(
        "--force", action="store_true", help="remove a model even if registered adapters use it"
    )
    rm.set_defaults(run=cmd_rm)


def megabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _source(entry: registry.Entry) -> str:
    if entry.run:
        return f"run {entry.run}"
    if entry.revision:  # a commit is long; its first 12 digits name it
        return entry.source.replace(entry.revision, entry.revision[:12])
    return entry.source


def cmd_ls(args: argparse.Namespace) -> int:
    entries = hub.cached_entries()
    if args.json:
        for entry in entries:
            print(json.dumps(vars(entry)))
        return 0
    rows = [("NAME", "KIND", "FORMAT", "SIZE", "BASE", "SOURCE")]
    for e in entries:
        rows.append((e.name, e.kind, e.format, megabytes(e.size), e.base or "-", _source(e)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if len(rows) == 1:
        print("(nothing cached yet: `sorai pull hf:ORG/REPO`, or train a model)")
    print(f"\ncache: {hub.sorai_home()} (set SORAI_HOME to move it)")
    return 0


def find(name: str) -> registry.Entry:
    """The cache's entry for `name` (as `ls` shows it, or `hf:` before it)."""
    for entry in hub.cached_entries():
        if entry.name in (name, name.removeprefix(hf.PREFIX)):
            return entry
    names = ", ".join(e.name for e in hub.cached_entries()) or "nothing"
    raise ModelNotFoundError(f"{name!r} is not in the cache (sorai ls lists {names})")


def dependents(entry: registry.Entry) -> list[registry.Entry]:
    """Registered adapters (and fine-tuned models) made over `entry`."""
    path = Path(entry.path).resolve()
    return [
        other
        for other in registry.load(hub.sorai_home()).values()
        if other.name != entry.name
        and other.base
        and (other.base in (entry.name, hf.PREFIX + entry.name) or Path(other.base) == path)
    ]


def cmd_show(args: argparse.Namespace) -> int:
    try:
        entry = find(args.name)
    except ModelNotFoundError:
        path = Path(args.name).expanduser()
        if not path.exists():
            raise
        entry = registry.Entry(
            name=str(path), kind=_kind_of(path), format=_format_of(path), path=str(path),
            source="a local path", size=registry.disk_size(path),
        )  # fmt: skip
    path = Path(entry.path)
    fields: list[tuple[str, str]] = [
        ("name", entry.name),
        ("kind", f"{entry.kind} ({entry.format})"),
        ("path", str(path)),
        ("size", megabytes(entry.size)),
        ("source", entry.source),
    ]
    if entry.created:
        fields.append(("added", time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created))))
    if entry.files:
        fields.append(("checked", f"{len(entry.files)} files against the Hub's checksums"))
    template = None
    if entry.kind == registry.ADAPTER:
        fields += _adapter_fields(path)
    elif entry.kind == registry.MODEL:
        details, template = _model_details(path)
        fields += details
    if entry.base:
        fields.append(("base", entry.base))
    if entry.run:
        fields.append(("run", entry.run))
    if entry.kind == registry.ADAPTER:
        base = entry.base or "BASE"
        serve = f"sorai serve -m {shlex.quote(base)} --adapter {shlex.quote(entry.name)}"
        fields.append(("serve", serve))
    made_on = dependents(entry)
    if made_on:
        fields.append(("adapters", ", ".join(e.name for e in made_on)))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    if template is not None and args.template:
        print("\n" + template)
    return 0


def _kind_of(path: Path) -> str:
    return registry.ADAPTER if (path / "adapter_config.json").exists() else registry.MODEL


def _format_of(path: Path) -> str:
    if (path / "adapter_config.json").exists():
        return "peft"
    return "safetensors" if path.is_dir() else "gguf"


def _adapter_fields(path: Path) -> list[tuple[str, str]]:
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        return [("lora", f"unreadable adapter_config.json ({e})")]
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    lora = f"r={config.get('r')}, alpha={config.get('lora_alpha')}, on {', '.join(targets)}"
    return [("lora", lora)]


def _model_details(path: Path) -> tuple[list[tuple[str, str]], str | None]:
    """(architecture, quantization, chat template) rows, and the template text; reads
    config files and GGUF metadata only, no weights."""
    from sorai.model.gguf import GGUFFile, is_gguf
    from sorai.model.loader import read_config
    from sorai.model.tokenizer import Tokenizer

    fields: list[tuple[str, str]] = []
    try:
        config = read_config(path)
    except SoraiError as e:
        return [("architecture", f"not readable: {e}")], None
    heads = f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV)"
    fields.append(
        (
            "architecture",
            f"{config.model_type}: {config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}, {heads}, vocab {config.vocab_size}, "
            f"context {config.context_length}",
        )
    )
    template: str | None = None
    if path.is_file() and is_gguf(path):
        gguf = GGUFFile(path)
        fields.append(("quantization", _gguf_quantization(gguf)))
        template = gguf.metadata.get("tokenizer.chat_template")
    else:
        fields.append(("quantization", _dense_quantization(path)))
        try:
            template = Tokenizer._read_chat_templates(
                path, _read_json(path / "tokenizer_config.json")
            ).get("default")
        except SoraiError:
            template = None
    if template:
        lines = template.count("\n") + 1
        fields.append(("chat template", f"{lines} lines (--template prints it)"))
    else:
        fields.append(("chat template", "none (chat falls back to plain text)"))
    return fields, template


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _gguf_quantization(gguf) -> str:
    import gguf as gguf_lib

    counts = Counter(gguf_lib.GGMLQuantizationType(t.qtype).name for t in gguf.tensor_infos)
    by_bytes = Counter()
    for info in gguf.tensor_infos:
        by_bytes[gguf_lib.GGMLQuantizationType(info.qtype).name] += info.nbytes
    main = by_bytes.most_common(1)[0][0] if by_bytes else "?"
    mix = ", ".join(f"{name} x{n}" for name, n in counts.most_common())
    return f"GGUF {main} ({mix} tensors)"


def _dense_quantization(path: Path) -> str:
    config = _read_json(path / "config.json")
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        method = quant.get("quant_method") or quant.get("scheme") or "quantized"
        return f"{method} ({json.dumps(quant, sort_keys=True)[:80]})"
    dtype = config.get("torch_dtype") or config.get("dtype") or "unknown dtype"
    return f"none ({dtype} weights)"


def cmd_rm(args: argparse.Namespace) -> int:
    entries = [find(name) for name in args.name]  # every name checked before any is removed
    for entry in entries:
        users = [u for u in dependents(entry) if u.name not in args.name]
        if users and not args.force:
            names = ", ".join(u.name for u in users)
            them = "them" if len(users) > 1 else "it"
            raise SoraiError(
                f"{entry.name!r} is the base of {names}; remove {them} first, or pass --force"
            )
    for entry in entries:
        print(_remove(entry))
    return 0


def _remove(entry: registry.Entry) -> str:
    home = hub.sorai_home()
    if entry.name in hub.KNOWN_MODELS:
        directory = hub.model_dir(entry.name)
        freed = registry.disk_size(directory)
        shutil.rmtree(directory)
        return f"removed {entry.name} (freed {megabytes(freed)})"
    registry.remove(home, entry.name)
    if not entry.owned:
        # A training run's export stays where the run wrote it: it is the user's directory.
        return f"forgot {entry.name}; its files stay in {entry.path}"
    freed = hf.remove_files(home, entry)
    return f"removed {entry.name} (freed {megabytes(freed)})"
