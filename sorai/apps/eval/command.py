"""`sorai eval run|compare|metrics`: evaluation at the command line."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sorai.apps.command import add_endpoint_args, api_key, connect, print_json, say, short, shown
from sorai.apps.text import plural
from sorai.errors import SoraiError

IN_PROCESS = "sorai-in-process"  # the judge endpoint's name in the cache when it has no --url

DESCRIPTION = """\
Score a dataset of queries, contexts, responses and ground truths with LLM-judged metrics
(groundedness, relevance, coherence, fluency, similarity: 1-5; faithfulness: 0-1) and computed
ones (exact_match, f1, rouge_l, bleu, embedding_similarity, classification, extraction, latency,
tokens). With --target, responses are generated first. A run directory gets rows.jsonl,
summary.json and report.html; running again with the same --out resumes where it stopped.

examples:
  sorai eval run qa.jsonl -m groundedness,relevance,f1 --judge-url http://127.0.0.1:8000/v1
  sorai eval run qa.csv --column query=question --column ground_truth=answer \\
      --target smollm2-135m-instruct+my-adapter --url http://127.0.0.1:8000/v1 -m similarity,rouge_l
  sorai eval run qa.jsonl -m groundedness --out runs/eval/base        # rerun: resumes
  sorai eval compare runs/eval/base runs/eval/tuned
  sorai eval metrics
"""


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "eval",
        help="evaluate responses: LLM-judged and computed metrics, report, compare",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(eval_parser=parser, run=run)
    actions = parser.add_subparsers(dest="eval_action", metavar="<action>")

    go = actions.add_parser(
        "run",
        help="score a dataset (generating responses first with --target)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    go.add_argument("data", help="rows: .jsonl (one object a line) or .csv (a header row)")
    go.add_argument(
        "-m",
        "--metrics",
        action="append",
        default=None,
        metavar="NAMES",
        help="comma-separated metrics (repeatable; `sorai eval metrics` lists them; default: "
        "what the data's columns allow among groundedness, relevance, similarity, f1, rouge_l)",
    )
    go.add_argument(
        "--column",
        action="append",
        default=None,
        metavar="FIELD=COLUMN",
        help="read FIELD (query, context, response, ground_truth) from COLUMN (repeatable)",
    )
    go.add_argument(
        "--target",
        default=None,
        metavar="MODEL|skill:NAME",
        help="generate each row's response first: a model (or adapter) name on the endpoint "
        "('default': the endpoint's model), or skill:summarize / skill:sentiment",
    )
    go.add_argument("--system", default=None, help="system prompt for --target MODEL")
    go.add_argument(
        "--max-tokens", type=int, default=512, help="per target response (default: %(default)s)"
    )
    add_endpoint_args(go, embeddings=True)
    judge = go.add_argument_group("judge")
    judge.add_argument(
        "--judge-url",
        default=None,
        help="the judge's OpenAI-compatible endpoint (default: --url's, else sorai's own "
        "server with its default model)",
    )
    judge.add_argument("--judge-api-key", default=None, metavar="KEY")
    judge.add_argument("--judge-model", default=None, metavar="NAME")
    judge.add_argument(
        "--prompts",
        default=None,
        metavar="DIR",
        help="judge prompts that replace the built-in ones of the same name (NAME.md)",
    )
    judge.add_argument(
        "--judge-max-tokens", type=int, default=600, help="per judgement (default: %(default)s)"
    )
    go.add_argument(
        "--threshold",
        action="append",
        default=None,
        metavar="[METRIC=]VALUE",
        help="pass at or above VALUE: for METRIC, or alone for every 1-5 judge metric "
        "(default: 3 for 1-5 scales, 0.5 for 0-1 scores)",
    )
    go.add_argument(
        "--evaluator",
        action="append",
        default=None,
        metavar="NAME=SPEC",
        help="a custom metric: NAME=module:function or NAME=prompt.md (repeatable; then name "
        "it in --metrics)",
    )
    go.add_argument(
        "--concurrency", type=int, default=4, help="rows in flight at once (default: %(default)s)"
    )
    go.add_argument(
        "--retries", type=int, default=4, help="per request on 429/5xx (default: %(default)s)"
    )
    go.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="the run directory (default: runs/eval/<UTC time>); an existing one resumes",
    )
    go.add_argument("--json", action="store_true", help="the summary as JSON on stdout")

    versus = actions.add_parser(
        "compare",
        help="per-metric differences of two runs with paired bootstrap 95%% intervals",
    )
    versus.add_argument("run_a", metavar="RUN_A", help="the baseline run directory")
    versus.add_argument("run_b", metavar="RUN_B", help="the candidate: differences are B - A")
    versus.add_argument("--top", type=int, default=5, help="most-changed rows per metric")
    versus.add_argument("--json", action="store_true", help="machine-readable output")

    actions.add_parser("metrics", help="the metrics, what they need and their thresholds")
    return parser


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "eval_action", None)
    if action == "run":
        return run_eval(args)
    if action == "compare":
        return run_compare(args)
    if action == "metrics":
        return run_metrics(args)
    args.eval_parser.print_help()
    return 2


# -- run ------------------------------------------------------------------------------------


def _metric_names(args: argparse.Namespace, present: set[str], target: bool) -> list[str]:
    if args.metrics:
        return [n.strip() for spec in args.metrics for n in spec.split(",") if n.strip()]
    have = present | ({"response"} if target else set())
    names = []
    if {"context", "response"} <= have:
        names.append("groundedness")
    if {"query", "response"} <= have:
        names.append("relevance")
    if {"response", "ground_truth"} <= have:
        names += ["similarity", "f1", "rouge_l"]
    if not names:
        raise SoraiError(
            "the data has no response to score (and no --target to generate one); columns "
            "found: " + (", ".join(sorted(present)) or "none")
        )
    return names


def parse_thresholds(specs: list[str] | None, evaluators: list) -> dict[str, float]:
    thresholds: dict[str, float] = {}
    for spec in specs or []:
        name, sep, value = spec.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise SoraiError(f"--threshold {spec!r}: not a number") from None
        if sep:
            if name not in {e.name for e in evaluators}:
                raise SoraiError(f"--threshold {spec!r}: {name!r} is not among the metrics run")
            thresholds[name] = number
        else:
            thresholds.update({e.name: number for e in evaluators if e.scale == (1.0, 5.0)})
    return thresholds


def run_eval(args: argparse.Namespace) -> int:
    from sorai.apps.eval.data import load_rows, parse_columns
    from sorai.apps.eval.registry import Context, register_spec, resolve
    from sorai.apps.eval.report import first_errors, summary_table, write_run
    from sorai.apps.eval.runner import Retry, Runner
    from sorai.apps.eval.summary import summarize

    if args.retries < 0 or args.concurrency < 1:
        raise SoraiError("--retries must be 0 or more and --concurrency 1 or more")
    rows = load_rows(args.data, parse_columns(args.column))
    for spec in args.evaluator or []:
        register_spec(spec)
    good = [r for r in rows if not r.error]
    present = {f for r in good for f in r.fields if r.has(f)}
    evaluators = resolve(_metric_names(args, present, args.target is not None))
    generated = {"response"} if args.target else set()
    first = good[0].where if good else f"{args.data}:1"
    for evaluator in evaluators:
        missing = [f for f in evaluator.needs if f not in present | generated]
        if missing:
            raise SoraiError(
                f"{first}: no row has {' or '.join(map(repr, missing))}, which {evaluator.name} "
                f"needs (--column {missing[0]}=COLUMN maps one)"
            )
        if evaluator.kind == "usage" and not args.target:
            raise SoraiError(f"{evaluator.name} is measured on the target's calls: add --target")
    if args.target and not any(r.has("query") for r in good):
        raise SoraiError(f"{first}: --target needs a query in the rows (--column query=COLUMN)")
    thresholds = parse_thresholds(args.threshold, evaluators)

    run_dir = Path(args.out or f"runs/eval/{datetime.now(UTC):%Y%m%d-%H%M%S}")
    resuming = (run_dir / "cache.jsonl").exists()
    needs_judge = any(e.uses_judge for e in evaluators)
    needs_embed = any(e.name == "embedding_similarity" for e in evaluators)
    from sorai.apps.client import Client

    clients: list[Any] = []
    try:
        main = None
        if args.target or ((needs_judge or needs_embed) and not args.judge_url):
            main = connect(args)
            clients.append(main)
        judge = main
        if args.judge_url:
            key = args.judge_api_key or api_key(args)
            judge = Client.connect(args.judge_url, key, args.judge_model, args.embedding_model)
            clients.append(judge)
        elif args.judge_model and main is not None:
            judge = Client(
                main.openai, args.judge_model, main.embedding_model, in_process=main.in_process
            )
        for client in clients:
            _own_retries(client)
        if judge is not None and judge not in clients:
            _own_retries(judge)
        target = _target(args, main) if args.target else None
        context = Context(judge, judge, args.prompts, args.judge_max_tokens)
        if judge is not None and judge.in_process:
            # sorai's own server listens on a new port each run: its URL must not key the
            # cache, or every resume would judge everything again.
            context.endpoint = IN_PROCESS
        runner = Runner(
            evaluators,
            context,
            run_dir,
            target,
            args.concurrency,
            Retry(args.retries),
            thresholds,
        )
        doing = "resuming" if resuming else "evaluating"
        say(
            f"{doing} {plural(len(rows), 'row')} of {shown(args.data)}: "
            f"{', '.join(e.name for e in evaluators)}"
            + (f" (judge {judge.model})" if needs_judge and judge is not None else "")
            + f" -> {shown(str(run_dir))}"
        )
        started = time.time()
        results = runner.run(rows)
    finally:
        for client in reversed(clients):
            client.close()
    summary = summarize(results, evaluators, thresholds)
    meta = {
        "data": args.data,
        "metrics": [e.name for e in evaluators],
        "target": target.name if target else None,
        "judge": f"{judge.model}" if needs_judge and judge is not None else None,
        "thresholds": {e.name: thresholds.get(e.name, e.threshold) for e in evaluators},
        "seconds": round(time.time() - started, 2),
        "cached_results": runner.cached,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_run(run_dir, results, summary, evaluators, meta)
    if args.json:
        print_json({"run": meta, "dir": str(run_dir), **summary})
    else:
        print(summary_table(summary))
    for error in first_errors(results):
        say(f"error: {error}")
    if resuming:
        cached = plural(runner.cached, "result")
        say(f"{cached} came from the cache of an earlier run in this directory")
    say(f"report: {shown(str(run_dir / 'report.html'))}")
    return 1 if summary["rows_with_errors"] else 0


def _own_retries(client: Any) -> None:
    """The openai client retries 429/5xx twice by itself: under the runner's own retries that
    made `--retries 4` up to 15 requests. The runner's count and backoff are the ones."""
    openai = getattr(client, "openai", None)
    if openai is not None:
        client.openai = openai.with_options(max_retries=0)


def _target(args: argparse.Namespace, client: Any):
    from sorai.apps.eval.runner import ModelTarget, SkillTarget

    if args.target.startswith("skill:"):
        return SkillTarget(client, args.target.removeprefix("skill:"))
    model = client.model if args.target in ("default", "") else args.target
    return ModelTarget(client, model, args.system, args.max_tokens)


# -- compare, metrics -----------------------------------------------------------------------


def run_compare(args: argparse.Namespace) -> int:
    from sorai.apps.eval.compare import compare
    from sorai.apps.eval.report import table

    diffs = compare(args.run_a, args.run_b, top=args.top)
    if args.json:
        print_json(
            [
                {
                    "metric": d.metric,
                    "pairs": d.pairs,
                    "mean_a": d.mean_a,
                    "mean_b": d.mean_b,
                    "diff": d.diff,
                    "ci95": [d.low, d.high],
                    "significant": d.significant,
                    "few_rows": d.few,
                    "higher_is_better": d.higher_is_better,
                    "changed": [
                        {"index": c.index, "query": c.query, "a": c.a, "b": c.b} for c in d.changed
                    ],
                }
                for d in diffs
            ]
        )
        return 0
    rows = []
    for d in diffs:
        verdict = "no clear change"
        if d.significant:
            better = (d.diff > 0) == d.higher_is_better
            verdict = "B better" if better else "B worse"
        if d.few:
            verdict += f" (only {plural(d.pairs, 'row')}: not enough to decide)"
        rows.append(
            [
                d.metric,
                f"{d.mean_a:.3f}",
                f"{d.mean_b:.3f}",
                f"{d.diff:+.3f}",
                f"[{d.low:+.3f}, {d.high:+.3f}]",
                str(d.pairs),
                verdict,
            ]
        )
    print(f"A = {args.run_a}\nB = {args.run_b}\n")
    print(table(["metric", "A", "B", "B - A", "95% CI", "rows", ""], rows))
    for d in diffs:
        if d.changed:
            print(f"\nmost changed, {d.metric}:")
            for c in d.changed:
                print(f"  #{c.index:<4} {c.a:g} -> {c.b:g}  {short(c.query, 70)}")
    return 0


def run_metrics(args: argparse.Namespace) -> int:
    from sorai.apps.eval.registry import evaluators
    from sorai.apps.eval.report import table

    rows = [
        [
            e.name,
            e.kind,
            ", ".join(e.needs) or "-",
            "-" if e.threshold is None else f"{e.threshold:g}",
            e.description,
        ]
        for e in evaluators().values()
    ]
    print(table(["metric", "kind", "needs", "pass at", "what"], rows))
    return 0
