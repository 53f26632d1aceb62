"""Grammar engines: llguidance vs xgrammar on this CPU, with the default model's tokenizer.

    python benchmarks/bench_grammar_engines.py [--model smollm2-135m-instruct] [--walks 5]
        [--compile-repeats 3] [--xgrammar-venv DIR] [--no-xgrammar] [--json out.json]

Measured for each engine, in its own fresh process:

- import: `import llguidance` (and apart `llguidance.torch`, the helpers sorai uses) /
  `import xgrammar`; torch is imported before either, so it is not counted;
- tokenizer setup: llguidance `LLTokenizer(tokenizer.json text)`, as sorai builds it;
  xgrammar `PreTrainedTokenizerFast(tokenizer_file=...)`, `TokenizerInfo.from_huggingface` and
  `GrammarCompiler` (cache off, so every compile is a real one);
- compile, per case (JSON schemas of a few shapes, any JSON object, a regex): grammar text to a
  matcher ready for its first mask (llguidance: `grammar_from_*` + `LLMatcher`; xgrammar:
  `compile_*` + `GrammarMatcher`), median of `--compile-repeats`;
- masks: a fixed valid output, tokenized by the model's tokenizer, is walked token by token on
  a new matcher (llguidance: a deep copy of the compiled one, as sorai does per request;
  xgrammar: a new `GrammarMatcher` on the compiled grammar): before each token, and once more
  at the end for EOS, the matcher fills a one-row int32 bitmask (time measured), the token is
  checked against the mask (not timed) and consumed (timed apart). The first walk is "cold"
  (llguidance builds its lexer states lazily); median and p99 are over the other walks.

Both engines see the same tokens, the same vocabulary size (the model's, 49152 for SmolLM2) and
the same EOS ids; JSON is compact (no free whitespace, "," and ":") with additionalProperties
false, which is how sorai compiles schemas (llguidance `whitespace_flexible: false`) and what
xgrammar's `any_whitespace=False, separators=(",", ":")` with strict mode gives.

xgrammar pulls torch, transformers and triton, so it never goes into the project venv: it is
installed on first use into `--xgrammar-venv` (default ~/.cache/sorai/bench-xgrammar-venv; a
plain venv with the running torch's exact version pinned, so pip never swaps in a CUDA build,
plus transformers and xgrammar without triton, which the CPU path does not import) and its
half runs there as a subprocess (`--worker xgrammar`). The llguidance half runs the same way
with this interpreter. If xgrammar cannot be installed, only llguidance is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (  # benchmarks/common.py: the script's folder is on sys.path
    run_logged,
    without_nan,
)

LLGUIDANCE = "llguidance"
XGRAMMAR = "xgrammar"
DEFAULT_XGRAMMAR_VENV = Path("~/.cache/sorai/bench-xgrammar-venv").expanduser()
# xgrammar's dependencies, less triton (only its GPU kernels import it).
XGRAMMAR_DEPS = ["transformers", "numpy", "pydantic", "typing-extensions", "apache-tvm-ffi>=0.1.11"]

# ----------------------------------------------------------------------------------------------
# Cases: a constraint and a valid output for it


def _obj(properties: dict[str, Any]) -> dict[str, Any]:
    """An object schema with every property required and nothing else allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


SMALL = _obj({"name": {"type": "string"}, "age": {"type": "integer"}})

# The person record of bench_guided.py: bounded strings, an integer range, an enum, an array.
RECORD = _obj(
    {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "occupation": {"type": "string", "maxLength": 40},
        "role": {"type": "string", "enum": ["engineer", "teacher", "doctor", "artist", "other"]},
        "skills": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "maxItems": 4,
        },
    }
)

NESTED = _obj(
    {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": _obj(
            {
                "name": {"type": "string", "maxLength": 60},
                "email": {"type": "string", "maxLength": 80},
                "address": _obj(
                    {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        "country": {"type": "string", "enum": ["US", "CA", "GB", "DE", "FR"]},
                    }
                ),
            }
        ),
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": _obj(
                {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "price": {"type": "number", "minimum": 0},
                }
            ),
        },
        "status": {"type": "string", "enum": ["pending", "paid", "shipped", "delivered"]},
        "gift": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 200}, {"type": "null"}]},
    }
)

NESTED_OUTPUT = {
    "id": "ORD-204817",
    "customer": {
        "name": "Maria Fernández",
        "email": "maria.fernandez@example.com",
        "address": {
            "street": "221 Baker Street",
            "city": "Springfield",
            "zip": "62704",
            "country": "US",
        },
    },
    "items": [
        {"sku": "LMP-0042", "quantity": 2, "price": 19.99},
        {"sku": "CBL-1180", "quantity": 5, "price": 4.5},
        {"sku": "DSK-7001", "quantity": 1, "price": 249.0},
    ],
    "status": "shipped",
    "gift": False,
    "note": "Leave the parcel with the neighbour at number 223 if nobody answers the door.",
}

REGEX = (
    r"[A-Z][a-z]{1,15} [A-Z][a-z]{1,15} <[a-z0-9._]{1,30}@[a-z0-9-]{1,30}\.(com|org|net)>, "
    r"born [0-9]{4}-[0-9]{2}-[0-9]{2}, phone \+1-[0-9]{3}-[0-9]{3}-[0-9]{4}"
)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


CASES: list[dict[str, Any]] = [
    {
        "name": "small",
        "kind": "json_schema",
        "source": SMALL,
        "text": _compact({"name": "Ada Lovelace", "age": 36}),
    },
    {
        "name": "record",
        "kind": "json_schema",
        "source": RECORD,
        "text": _compact(
            {
                "name": "Grace Hopper",
                "age": 85,
                "occupation": "Computer scientist",
                "role": "engineer",
                "skills": ["COBOL", "compilers", "teaching", "naval logistics"],
            }
        ),
    },
    {"name": "nested", "kind": "json_schema", "source": NESTED, "text": _compact(NESTED_OUTPUT)},
    {
        "name": "any-object",
        "kind": "json_schema",
        "source": {"type": "object"},
        "text": _compact(NESTED_OUTPUT),
    },
    {
        "name": "regex",
        "kind": "regex",
        "source": REGEX,
        "text": "Grace Hopper <grace.hopper@navy-history.org>, born 1906-12-09, phone "
        "+1-202-555-0143",
    },
]

# ----------------------------------------------------------------------------------------------
# Workers: run in the engine's own interpreter, stdlib + torch + the engine only


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class LLGuidanceEngine:
    def __init__(self, job: dict[str, Any], timings: dict[str, float]) -> None:
        started = time.perf_counter()
        import llguidance

        timings["import_ms"] = _ms(started)
        # Apart: llguidance.torch compiles a kernel with torch.compile at import, which pulls
        # in torch._dynamo (sorai's mask_logits imports it on the first guided step).
        started = time.perf_counter()
        import llguidance.torch as llg_torch

        timings["import_torch_helpers_ms"] = _ms(started)
        self.llg, self.llg_torch = llguidance, llg_torch
        started = time.perf_counter()
        text = Path(job["tokenizer_json"]).read_text(encoding="utf-8")
        self.tokenizer = llguidance.LLTokenizer(
            text, n_vocab=job["vocab_size"], eos_token=job["eos_token_ids"]
        )
        timings["tokenizer_ms"] = _ms(started)
        self.version = _version("llguidance")

    def compile(self, case: dict[str, Any]) -> Any:
        matcher = self.llg.LLMatcher
        if case["kind"] == "regex":
            grammar = matcher.grammar_from_regex(case["source"])
        else:
            grammar = matcher.grammar_from_json_schema(
                case["source"], defaults={"whitespace_flexible": False}
            )
        compiled = matcher(self.tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise RuntimeError(compiled.get_error())
        return compiled

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def bitmask(self, vocab_size: int) -> Any:
        return self.llg_torch.allocate_token_bitmask(1, vocab_size)

    def fill(self, matcher: Any, bitmask: Any) -> None:
        self.llg_torch.fill_next_token_bitmask(matcher, bitmask, 0)

    def consume(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token)) and not matcher.is_error()


class XGrammarEngine:
    def __init__(self, job: dict[str, Any], timings: dict[str, float]) -> None:
        started = time.perf_counter()
        import xgrammar

        timings["import_ms"] = _ms(started)
        self.xgr = xgrammar
        started = time.perf_counter()
        from transformers import PreTrainedTokenizerFast

        timings["import_transformers_ms"] = _ms(started)
        started = time.perf_counter()
        hf = PreTrainedTokenizerFast(tokenizer_file=job["tokenizer_json"])
        timings["hf_tokenizer_ms"] = _ms(started)
        started = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=job["vocab_size"], stop_token_ids=job["eos_token_ids"]
        )
        self.compiler = xgrammar.GrammarCompiler(
            info, max_threads=job["xgrammar_threads"], cache_enabled=False
        )
        timings["tokenizer_info_ms"] = _ms(started)
        timings["tokenizer_ms"] = timings["hf_tokenizer_ms"] + timings["tokenizer_info_ms"]
        self.version = _version("xgrammar")

    def compile(self, case: dict[str, Any]) -> Any:
        if case["kind"] == "regex":
            compiled = self.compiler.compile_regex(case["source"])
        else:
            compiled = self.compiler.compile_json_schema(
                json.dumps(case["source"]),
                any_whitespace=False,
                separators=(",", ":"),
                strict_mode=True,
            )
        self.xgr.GrammarMatcher(compiled)  # part of "ready for the first mask"
        return compiled

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, vocab_size: int) -> Any:
        return self.xgr.allocate_token_bitmask(1, vocab_size)

    def fill(self, matcher: Any, bitmask: Any) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def consume(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _allowed(bitmask: Any, token: int) -> bool:
    return bool((int(bitmask[0, token >> 5]) >> (token & 31)) & 1)


def walk(engine: Any, compiled: Any, tokens: list[int], job: dict[str, Any]) -> dict[str, Any]:
    """One pass over `tokens` on a new matcher: mask and consume times (µs), and validity."""
    matcher = engine.matcher(compiled)
    bitmask = engine.bitmask(job["vocab_size"])
    masks, consumes = [], []
    error = ""
    clock = time.perf_counter_ns
    for i, token in enumerate(tokens):
        started = clock()
        engine.fill(matcher, bitmask)
        masks.append((clock() - started) / 1e3)
        if not _allowed(bitmask, token):
            error = f"token {i} ({token}) is not allowed by the mask"
            break
        started = clock()
        ok = engine.consume(matcher, token)
        consumes.append((clock() - started) / 1e3)
        if not ok:
            error = f"token {i} ({token}) was refused"
            break
    else:
        started = clock()
        engine.fill(matcher, bitmask)  # the last mask: only EOS may follow
        masks.append((clock() - started) / 1e3)
        if not any(_allowed(bitmask, eos) for eos in job["eos_token_ids"]):
            error = "EOS is not allowed after the whole output"
    return {"masks": masks, "consumes": consumes, "error": error}


def run_worker(engine_name: str, job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    engine = (
        LLGuidanceEngine(job, timings)
        if engine_name == LLGUIDANCE
        else XGrammarEngine(job, timings)
    )
    result: dict[str, Any] = {"engine": engine_name, "version": engine.version, **timings}
    cases = []
    for case in job["cases"]:
        out: dict[str, Any] = {"name": case["name"], "tokens": len(case["token_ids"])}
        try:
            compiles = []
            for _ in range(job["compile_repeats"]):
                gc.collect()
                started = time.perf_counter()
                compiled = engine.compile(case)
                compiles.append(_ms(started))
            walks = []
            gc.disable()
            try:
                for _ in range(job["walks"]):
                    walks.append(walk(engine, compiled, case["token_ids"], job))
            finally:
                gc.enable()
        except Exception as exc:  # an engine that cannot take the case: say so, go on
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
            cases.append(out)
            continue
        errors = [w["error"] for w in walks if w["error"]]
        warm = [w for w in walks[1:] if not w["error"]] or walks[:1]
        masks = [t for w in warm for t in w["masks"]]
        consumes = [t for w in warm for t in w["consumes"]]
        cold = walks[0]["masks"]
        out.update(
            compile_ms=statistics.median(compiles),
            compile_runs_ms=compiles,
            first_mask_us=cold[0] if cold else float("nan"),
            cold_mask_mean_us=statistics.fmean(cold) if cold else float("nan"),
            mask_p50_us=percentile(masks, 50),
            mask_p99_us=percentile(masks, 99),
            mask_mean_us=statistics.fmean(masks) if masks else float("nan"),
            consume_p50_us=percentile(consumes, 50),
            masks_timed=len(masks),
        )
        if errors:
            out["error"] = errors[0]
        cases.append(out)
    result["cases"] = cases
    return result


def worker_main(engine_name: str, job_path: Path, out_path: Path) -> None:
    job = json.loads(job_path.read_text())
    out_path.write_text(json.dumps(run_worker(engine_name, job), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# The xgrammar venv


def xgrammar_python(venv: Path, torch_requirement: str) -> Path | None:
    """The venv's interpreter once xgrammar imports there; installs it on first use."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import torch, transformers, xgrammar"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    log = venv.with_name(venv.name + "-install.log")
    print(
        f"  xgrammar: installing into {venv} ({torch_requirement}, transformers, xgrammar; "
        f"a few minutes; log {log})",
        flush=True,
    )
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(python), "-m", "pip", "install"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # torch pinned to the running one's exact version (e.g. 2.13.0+cpu): an unpinned torch
        # would be the multi-GB CUDA build.
        pip + [torch_requirement, *XGRAMMAR_DEPS],
        pip + ["--no-deps", "xgrammar"],
    ]
    started = time.monotonic()
    with open(log, "w") as out:
        for step in steps:
            if not run_logged(step, out, "xgrammar", started):
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
                print(f"  xgrammar: install failed ({' '.join(step)}):\n{tail}")
                return None
        # Perhaps this xgrammar version needs more than XGRAMMAR_DEPS: its own list then, with
        # torch held at the pinned version.
        imports = subprocess.run(check, capture_output=True).returncode == 0
        if not imports and not run_logged(
            pip + [torch_requirement, "xgrammar"], out, "xgrammar", started
        ):
            print("  xgrammar: install failed")
            return None
    if subprocess.run(check, capture_output=True).returncode != 0:
        print(f"  xgrammar: installed but does not import (see {log})")
        return None
    print(f"  xgrammar: installed in {time.monotonic() - started:.0f} s")
    return python


def run_engine(python: Path, engine_name: str, job: dict[str, Any], tmp: Path) -> dict[str, Any]:
    job_path, out_path = tmp / "job.json", tmp / f"{engine_name}.json"
    job_path.write_text(json.dumps(job))
    command = [
        str(python),
        str(Path(__file__).resolve()),
        "--worker",
        engine_name,
        "--job",
        str(job_path),
        "--out",
        str(out_path),
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"{engine_name} worker failed:\n{tail}")
    return json.loads(out_path.read_text())


# ----------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


COLUMNS = [
    ("compile_ms", "compile ms", 2),
    ("first_mask_us", "1st mask us", 1),
    ("cold_mask_mean_us", "cold mean us", 1),
    ("mask_p50_us", "mask p50 us", 1),
    ("mask_p99_us", "mask p99 us", 1),
    ("mask_mean_us", "mask mean us", 1),
    ("consume_p50_us", "consume p50", 1),
]


def report(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_engine = {r["engine"]: r for r in results}
    llg, xgr = by_engine.get(LLGUIDANCE), by_engine.get(XGRAMMAR)
    print()
    print("setup (ms, one fresh process each):")
    print(f"  {'engine':12s} {'version':>8s} {'import':>8s} {'tokenizer':>10s}")
    for r in results:
        print(
            f"  {r['engine']:12s} {r['version']:>8s} {fmt(r['import_ms']):>8s} "
            f"{fmt(r['tokenizer_ms']):>10s}"
            + (
                f"   (transformers tokenizer {fmt(r['hf_tokenizer_ms'])}, TokenizerInfo + "
                f"GrammarCompiler {fmt(r['tokenizer_info_ms'])})"
                if r["engine"] == XGRAMMAR
                else f"   (+ import llguidance.torch {fmt(r['import_torch_helpers_ms'])})"
            )
        )
    if llg and xgr:
        print(
            "  xgrammar/llguidance tokenizer setup: "
            + ratio(xgr["tokenizer_ms"], llg["tokenizer_ms"])
        )
    print()
    header = f"{'case':11s} {'engine':12s} {'tokens':>6s} " + " ".join(
        f"{title:>12s}" for _, title, _ in COLUMNS
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {}
    names = [c["name"] for c in (llg or xgr or {"cases": []})["cases"]]
    for name in names:
        rows = []
        for r in results:
            case = next(c for c in r["cases"] if c["name"] == name)
            rows.append((r["engine"], case))
            cells = " ".join(f"{fmt(case.get(key), d):>12s}" for key, _, d in COLUMNS)
            label = name if len(rows) == 1 else ""
            print(f"{label:11s} {r['engine']:12s} {case['tokens']:6d} {cells}")
            if case.get("error"):
                print(f"{'':11s}   ! {case['error']}")
        if llg and xgr:
            a = next(c for c in llg["cases"] if c["name"] == name)
            b = next(c for c in xgr["cases"] if c["name"] == name)
            cells = " ".join(f"{ratio(b.get(key), a.get(key)):>12s}" for key, _, _ in COLUMNS)
            print(f"{'':11s} {'xgr/llg':12s} {'':6s} {cells}")
            summary[name] = {key: ratio(b.get(key), a.get(key)) for key, _, _ in COLUMNS}
    if llg and xgr:
        print()
        print("xgr/llg > 1: llguidance is faster (takes less time) by that factor.")
        all_llg = [c.get("mask_p50_us") for c in llg["cases"] if not c.get("error")]
        all_xgr = [c.get("mask_p50_us") for c in xgr["cases"] if not c.get("error")]
        if all_llg and all_xgr:
            print(
                f"median over cases of the mask p50: llguidance "
                f"{statistics.median(all_llg):.1f} us, xgrammar {statistics.median(all_xgr):.1f} us"
            )
    return {"engines": results, "xgrammar_over_llguidance": summary}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: sorai's default model")
    parser.add_argument("--walks", type=int, default=5, help="walks per case (first is cold)")
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument("--cases", default="", help="comma-separated case names (default all)")
    parser.add_argument("--xgrammar-venv", type=Path, default=DEFAULT_XGRAMMAR_VENV)
    parser.add_argument(
        "--xgrammar-torch",
        default=None,
        help="torch requirement for the xgrammar venv (default: the running torch's version)",
    )
    parser.add_argument(
        "--xgrammar-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="xgrammar GrammarCompiler max_threads (default: the cores; llguidance uses one)",
    )
    parser.add_argument("--no-xgrammar", action="store_true", help="measure llguidance only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=[LLGUIDANCE, XGRAMMAR], help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.walks < 2:
        parser.error("--walks must be >= 2 (the first walk is the cold one)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.job, args.out)
        return

    import torch

    import sorai
    from sorai import hub

    model = args.model or hub.DEFAULT_MODEL
    wanted = {n.strip() for n in args.cases.split(",") if n.strip()}
    cases = [c for c in CASES if not wanted or c["name"] in wanted]
    with tempfile.TemporaryDirectory(prefix="sorai-grammar-bench-") as tmp_name:
        tmp = Path(tmp_name)
        llm = sorai.load(model)
        tokenizer = llm.tokenizer
        tokenizer.save(tmp / "tokenizer")
        job = {
            "tokenizer_json": str(tmp / "tokenizer" / "tokenizer.json"),
            "vocab_size": int(llm.model.config.vocab_size),
            "eos_token_ids": list(tokenizer.eos_token_ids),
            "walks": args.walks,
            "compile_repeats": args.compile_repeats,
            "xgrammar_threads": args.xgrammar_threads,
            "cases": [
                {
                    "name": c["name"],
                    "kind": c["kind"],
                    "source": c["source"],
                    "token_ids": tokenizer.encode(c["text"]),
                }
                for c in cases
            ],
        }
        del llm
        print(
            f"model {model}: vocabulary {job['vocab_size']}, EOS {job['eos_token_ids']}; "
            f"{len(cases)} cases ({', '.join(c['name'] for c in cases)}), {args.walks} walks "
            f"each (1 cold), {args.compile_repeats} compiles; {os.cpu_count()} cores, load "
            f"average {os.getloadavg()[0]:.1f}"
        )
        results = []
        print(f"{LLGUIDANCE}: measuring", flush=True)
        results.append(run_engine(Path(sys.executable), LLGUIDANCE, job, tmp))
        if args.no_xgrammar:
            print(f"{XGRAMMAR}: skipped (--no-xgrammar)")
        else:
            requirement = args.xgrammar_torch or f"torch=={torch.__version__}"
            python = xgrammar_python(args.xgrammar_venv, requirement)
            if python is None:
                print(f"{XGRAMMAR}: could not be installed; llguidance only")
            else:
                print(
                    f"{XGRAMMAR}: measuring (GrammarCompiler max_threads {args.xgrammar_threads})",
                    flush=True,
                )
                try:
                    results.append(run_engine(python, XGRAMMAR, job, tmp))
                except RuntimeError as exc:
                    print(f"{XGRAMMAR}: {exc}")
    out = report(results)
    if args.json:
        args.json.write_text(json.dumps(without_nan(out), indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
