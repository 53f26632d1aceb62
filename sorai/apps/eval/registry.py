"""Evaluators by name: the built-in ones and custom ones (a Python function or a prompt file).

An evaluator scores one row. It names the fields it needs, its kind (`judge`: an LLM judge on
a 1-5 scale; `computed`: code, no model; `usage`: read from the target's call), the threshold a
score passes at, and a digest of what it depends on besides the row (its prompts), which the
result cache keys on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sorai.apps.eval import text_metrics
from sorai.apps.eval.data import EvalRow, as_text
from sorai.apps.eval.extraction import field_counts
from sorai.apps.eval.judge import Prompt, faithfulness, judge, load_prompt, read_prompt
from sorai.apps.eval.verdicts import answers, claim_score, grounded_in
from sorai.errors import SoraiError

JUDGE_THRESHOLD = 3.0  # 1-5 scales pass at 3 and above, as Azure AI evaluation's default
UNIT_THRESHOLD = 0.5  # 0-1 scores (faithfulness, F1, ROUGE-L, ...) pass at one half


@dataclass
class Score:
    value: float | None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more columns, e.g. precision


@dataclass
class Context:
    """What evaluators may use besides the row."""

    judge: Any = None  # a Client (chat_json) for LLM-judged metrics
    embedder: Any = None  # a Client (embed) for embedding similarity
    prompts_dir: str | None = None
    max_tokens: int = 600
    # What names the judge's endpoint in the result cache (default: its URL); the in-process
    # server's URL changes with its port every run.
    endpoint: str | None = None


@dataclass
class Evaluator:
    name: str
    needs: tuple[str, ...]
    run: Callable[[EvalRow, Context], Score]
    kind: str = "computed"  # judge | computed | usage
    threshold: float | None = UNIT_THRESHOLD
    scale: tuple[float, float] | None = (0.0, 1.0)  # for the report's histogram; None: data
    higher_is_better: bool = True
    description: str = ""
    digest: Callable[[Context], str] = field(default=lambda ctx: "")

    @property
    def uses_judge(self) -> bool:
        return self.kind == "judge"


def _values(row: EvalRow) -> dict[str, str]:
    return {
        name: as_text(row.fields.get(name))
        for name in ("query", "context", "response", "ground_truth")
    }


def prompt_evaluator(
    name: str, prompt: Prompt | str, description: str = "", alternative: str | None = None
) -> Evaluator:
    """An LLM-judged 1-5 evaluator from a prompt (a Prompt, or a built-in prompt's name).
    alternative: the built-in prompt used when the row has no query (groundedness)."""

    def resolve(ctx: Context, which: Prompt | str) -> Prompt:
        return which if isinstance(which, Prompt) else load_prompt(which, ctx.prompts_dir)

    def run(row: EvalRow, ctx: Context) -> Score:
        chosen = alternative if alternative and not row.has("query") else prompt
        verdict = judge(ctx.judge, resolve(ctx, chosen), _values(row), ctx.max_tokens)
        return Score(verdict.score, verdict.reason)

    def digest(ctx: Context) -> str:
        names = [prompt] + ([alternative] if alternative else [])
        return "+".join(resolve(ctx, n).digest for n in names)

    template = prompt if isinstance(prompt, Prompt) else load_prompt(prompt)
    needs = template.variables() & {"query", "context", "response", "ground_truth"}
    if alternative:
        needs.discard("query")
    needs = tuple(sorted(needs))
    return Evaluator(
        name, needs, run, "judge", JUDGE_THRESHOLD, (1.0, 5.0), True, description, digest
    )


def claim_evaluator(name: str, needs: tuple[str, ...], description: str) -> Evaluator:
    """A built-in 1-5 evaluator scored from per-claim yes/no verdicts (see verdicts.py): the
    prompt `NAME_claim`, the evidence check groundedness' context, similarity's ground truth
    or relevance's query. A `--prompts` folder with a rubric `NAME.md` (the free 1-5 judge of
    the rubric prompts) is judged by that rubric instead: an override keeps its meaning."""
    rubric = prompt_evaluator(
        name,
        name,
        description,
        alternative="groundedness_no_query" if name == "groundedness" else None,
    )

    def overridden(ctx: Context) -> bool:
        return bool(ctx.prompts_dir) and (Path(ctx.prompts_dir) / f"{name}.md").is_file()

    def run(row: EvalRow, ctx: Context) -> Score:
        if overridden(ctx):
            return rubric.run(row, ctx)
        values = _values(row)
        if name == "relevance":
            check = answers(values["query"])
        elif name == "similarity":
            check = grounded_in(values["ground_truth"])
        else:
            check = grounded_in(values["context"])
        prompt = load_prompt(f"{name}_claim", ctx.prompts_dir)
        verdict = claim_score(ctx.judge, prompt, values, check)
        return Score(verdict.score, verdict.reason)

    def digest(ctx: Context) -> str:
        if overridden(ctx):
            return rubric.digest(ctx)
        return "claims+" + load_prompt(f"{name}_claim", ctx.prompts_dir).digest

    return Evaluator(
        name, needs, run, "judge", JUDGE_THRESHOLD, (1.0, 5.0), True, description, digest
    )


def _faithfulness(row: EvalRow, ctx: Context) -> Score:
    verdict = faithfulness(
        ctx.judge,
        load_prompt("faithfulness_statements", ctx.prompts_dir),
        load_prompt("faithfulness_verdicts", ctx.prompts_dir),
        _values(row),
        ctx.max_tokens,
    )
    return Score(verdict.score, verdict.reason)


def _text(metric: Callable[[str, str], float]) -> Callable[[EvalRow, Context], Score]:
    def run(row: EvalRow, ctx: Context) -> Score:
        values = _values(row)
        return Score(metric(values["response"], values["ground_truth"]))

    return run


def _embedding_similarity(row: EvalRow, ctx: Context) -> Score:
    values = _values(row)
    a, b = ctx.embedder.embed([values["response"], values["ground_truth"]])
    return Score(text_metrics.cosine(a, b))


def _classification(row: EvalRow, ctx: Context) -> Score:
    from sorai.apps.eval.classification import label

    values = _values(row)
    return Score(float(label(values["response"]) == label(values["ground_truth"])))


def _extraction(row: EvalRow, ctx: Context) -> Score:
    counts = field_counts(row.fields.get("response"), row.fields.get("ground_truth"))
    scores = counts.scores()
    return Score(
        scores["f1"],
        counts.note,
        extra={
            "precision": scores["precision"],
            "recall": scores["recall"],
            "fields": counts.by_field,
        },
    )


def _usage(key: str) -> Callable[[EvalRow, Context], Score]:
    def run(row: EvalRow, ctx: Context) -> Score:
        generation = row.extra.get("_generation")
        if not generation:
            raise SoraiError(f"{key} is measured on the target's call: run with --target")
        if key == "latency":
            return Score(generation["latency_s"])
        return Score(
            float(generation["prompt_tokens"] + generation["completion_tokens"]),
            extra={
                "prompt": generation["prompt_tokens"],
                "completion": generation["completion_tokens"],
            },
        )

    return run


def _builtins() -> dict[str, Evaluator]:
    both = ("response", "ground_truth")
    found = [
        claim_evaluator(
            "groundedness",
            ("context", "response"),
            "share of the response's claims the context supports (1-5; yes/no per claim)",
        ),
        claim_evaluator(
            "relevance",
            ("query", "response"),
            "share of the response's claims that answer the query (1-5; yes/no per claim)",
        ),
        prompt_evaluator(
            "coherence", "coherence", "is the response logical and well ordered (1-5)"
        ),
        prompt_evaluator("fluency", "fluency", "language quality of the response (1-5)"),
        claim_evaluator(
            "similarity",
            ("response", "ground_truth"),
            "share of the response's claims the ground truth says too (1-5; yes/no per claim)",
        ),
        Evaluator(
            "faithfulness",
            ("context", "response"),
            _faithfulness,
            "judge",
            UNIT_THRESHOLD,
            description="supported statements / all statements of the response (0-1, ragas)",
            digest=lambda ctx: "+".join(
                load_prompt(n, ctx.prompts_dir).digest
                for n in ("faithfulness_statements", "faithfulness_verdicts")
            ),
        ),
        Evaluator(
            "exact_match",
            both,
            _text(text_metrics.exact_match),
            description="same tokens, articles aside, as SQuAD (0/1)",
        ),
        Evaluator("f1", both, _text(text_metrics.token_f1), description="SQuAD token F1 (0-1)"),
        Evaluator("rouge_l", both, _text(text_metrics.rouge_l), description="ROUGE-L F (0-1)"),
        Evaluator("bleu", both, _text(text_metrics.bleu), description="sentence BLEU+1 (0-1)"),
        Evaluator(
            "embedding_similarity",
            both,
            _embedding_similarity,
            scale=None,  # a cosine may be negative: the chart spans the scores found
            description="cosine of the embeddings of response and ground truth (-1 to 1)",
        ),
        Evaluator(
            "classification",
            both,
            _classification,
            description="label correct (0/1); the summary adds accuracy, macro-F1, confusion",
        ),
        Evaluator(
            "extraction",
            both,
            _extraction,
            description="field-level F1 of JSON records (row); micro P/R/F1 in the summary",
        ),
        Evaluator(
            "latency",
            (),
            _usage("latency"),
            "usage",
            None,
            None,
            False,
            "seconds the target took (with --target)",
        ),
        Evaluator(
            "tokens",
            (),
            _usage("tokens"),
            "usage",
            None,
            None,
            False,
            "prompt + completion tokens of the target's call (with --target)",
        ),
    ]
    return {e.name: e for e in found}


_REGISTRY: dict[str, Evaluator] = {}


def evaluators() -> dict[str, Evaluator]:
    if not _REGISTRY:
        _REGISTRY.update(_builtins())
    return _REGISTRY


def register(
    name: str,
    function: Callable[[dict[str, Any]], Any] | None = None,
    *,
    prompt: str | None = None,
    needs: tuple[str, ...] = (),
    threshold: float | None = None,
) -> Evaluator:
    """Register a custom evaluator under `name`: a Python function of the row's fields (a dict
    with query, context, response, ground_truth as text, plus the row's other columns) that
    returns a number, a bool, or a dict with `score` and optionally `reason`; or a prompt file
    (`prompt=PATH`, judged on the 1-5 scale like the built-in ones)."""
    if (function is None) == (prompt is None):
        raise SoraiError(f"evaluator {name!r}: give a function or a prompt file, not both")
    if not name.isidentifier():
        raise SoraiError(f"evaluator name {name!r}: use letters, digits and _")
    if prompt is not None:
        evaluator = prompt_evaluator(name, read_prompt(prompt, name))
        if threshold is not None:
            evaluator.threshold = threshold
    else:
        evaluator = _function_evaluator(name, function, needs, threshold)
    evaluators()[name] = evaluator
    return evaluator


def _function_evaluator(
    name: str, function: Callable[..., Any], needs: tuple[str, ...], threshold: float | None
) -> Evaluator:
    def run(row: EvalRow, ctx: Context) -> Score:
        answer = function({**row.extra, **_values(row)})
        if isinstance(answer, dict):
            score, reason = answer.get("score"), answer.get("reason")
        else:
            score, reason = answer, None
        if isinstance(score, bool):
            score = float(score)
        if not isinstance(score, int | float):
            raise SoraiError(f"{name} returned {answer!r}, not a number or {{score, reason}}")
        return Score(float(score), None if reason is None else str(reason))

    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        source = getattr(function, "__qualname__", name)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return Evaluator(
        name,
        needs,
        run,
        "computed",
        threshold,
        None,
        True,
        f"custom: {getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}",
        lambda ctx: digest,
    )


def register_spec(spec: str) -> Evaluator:
    """`NAME=module:function` or `NAME=path/to/prompt.md` (the CLI's --evaluator)."""
    name, sep, target = spec.partition("=")
    if not sep or not name.strip() or not target.strip():
        raise SoraiError(f"--evaluator {spec!r}: expected NAME=module:function or NAME=FILE.md")
    name, target = name.strip(), target.strip()
    if target.endswith((".md", ".txt", ".j2")) or Path(target).is_file():
        return register(name, prompt=target)
    module_name, colon, attr = target.rpartition(":")
    if not colon:
        raise SoraiError(f"--evaluator {spec!r}: expected module:function or a prompt file")
    if module_name.endswith(".py"):
        module = _module_from_file(spec, module_name)
    else:
        # As `python -m` does: modules beside the working directory import.
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise SoraiError(f"--evaluator {spec!r}: cannot import {module_name}: {e}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise SoraiError(f"--evaluator {spec!r}: {module_name} has no function {attr!r}")
    return register(name, function)


def _module_from_file(spec: str, path: str) -> Any:
    """`path/to/checks.py:function`: the file imported as a module of its own."""
    if not Path(path).is_file():
        raise SoraiError(f"--evaluator {spec!r}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"sorai_eval_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise SoraiError(f"--evaluator {spec!r}: {path} fails to import: {e}") from None
    return module


def resolve(names: list[str]) -> list[Evaluator]:
    known = evaluators()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SoraiError(
            f"unknown metric {', '.join(map(repr, unknown))}; metrics: {', '.join(known)} "
            "(--evaluator NAME=... adds one)"
        )
    return [known[n] for n in dict.fromkeys(names)]
