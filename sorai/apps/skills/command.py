"""`sorai classify|extract|summarize|sentiment|topics|ask`: the skills at the command line.

Each verb talks to a model through `sorai.apps.client.Client`: `--url` names any
OpenAI-compatible endpoint; without it `Client.find` takes $SORAI_URL, a `sorai serve` on the
default port, else starts sorai's own server in this process. classify, extract and sentiment
take texts as arguments or, in batch mode, a file (`--input`: JSONL, CSV with a header row, or
text with one item a line) and write one JSON line per input row: the row plus the result. A
bad row is reported as `file:line: what is wrong` and the run goes on; the exit code is 1 when
any row failed, 2 for a usage error.

The skills are imported when a verb runs, so `import sorai.cli` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sorai.apps.command import (
    TEXT_FIELD,
    add_endpoint_args,
    connect,
    pad,
    print_json,
    read_json,
    read_jsonl,
    read_rows,
    say,
    short,
    shown,
    width,
)
from sorai.apps.rag.search import MODES
from sorai.apps.skills.base import SkillError
from sorai.apps.text import plural
from sorai.errors import SoraiError

# summarize.STYLES' names, here so that building the parser imports no skill (tested equal).
STYLES = ("paragraph", "bullets", "one-line", "executive")

CLASSIFY_DESCRIPTION = """\
One label of a fixed set per text, with a confidence: the label is decoded under a JSON schema
whose enum is the labels, so it is always one of them; the confidence is the label's probability
among the labels' at its first tokens (None when the endpoint reports no log-probabilities).

examples:
  sorai classify "全日空の羽田発、ロサンゼルス行きで、10/20 で手配できますか。" \\
      --labels レストラン予約,航空機の手配,その他 \\
      --example "オペレーターにつないでいただけませんか。=>その他"
  sorai classify --image scan.png --labels invoice,receipt,letter
  sorai classify --labels-file labels.json --examples-file few_shot.jsonl \\
      --input inquiries.jsonl --output labelled.jsonl
"""

EXTRACT_DESCRIPTION = """\
Fields out of a text as one JSON object that validates against the fields' schema (decoded under
it, then validated again).

examples:
  sorai extract "Call Ann Lee at 555-0100 on Monday." --fields "name: the person" \\
      --fields "phone: the phone number"
  sorai extract --schema invoice.schema.json --input mails.csv --text-field body
  sorai extract --image form.png --schema form.schema.json
"""

SUMMARIZE_DESCRIPTION = """\
A summary of a text file of any length (.txt, .md; .html and .pdf are read as `sorai index`
reads them) or of stdin: one request when it fits the model's window, else map-reduce over
chunks that fit.

examples:
  sorai summarize report.txt --style bullets --max-words 80
  cat notes.md | sorai summarize - --style one-line --json
"""

SENTIMENT_DESCRIPTION = """\
positive, neutral or negative with a score P(positive) - P(negative) in [-1, 1], per text or
per sentence.

examples:
  sorai sentiment "The room was lovely." "The staff were rude."
  sorai sentiment --per-sentence "Great food. Terrible service."
  sorai sentiment --input reviews.csv --text-field review --output scored.jsonl
"""

TOPICS_DESCRIPTION = """\
The topics in a collection of texts: clusters of their embeddings, each named by the model.

examples:
  sorai topics --input tickets.jsonl --max-topics 6
  sorai topics --input comments.txt --k 4 --json
"""

ASK_DESCRIPTION = """\
An answer from your documents (indexed with `sorai index add`), with numbered citations; when no
passage is relevant it says so rather than guessing.

examples:
  sorai ask "How do I rotate the API keys?"
  sorai ask "保証期間は？" --index manuals.sqlite -k 8 --mode keyword
"""


# -- arguments ------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, embeddings: bool = False) -> None:
    add_endpoint_args(parser, embeddings=embeddings)
    parser.add_argument("--json", action="store_true", help="machine-readable output (JSON)")


def _add_batch(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batch mode")
    group.add_argument(
        "--input",
        default=None,
        metavar="FILE",
        help="texts from a file instead of arguments: .jsonl (one JSON object a line), .csv "
        "(a header row) or .txt (one text a line); '-' reads JSONL from stdin",
    )
    group.add_argument(
        "--text-field",
        default=TEXT_FIELD,
        metavar="NAME",
        help="the field (JSONL) or column (CSV) holding the text (default: %(default)s)",
    )
    group.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="where the results go, one JSON line per input row: the row plus the result "
        "(default: stdout)",
    )


def _add_texts(parser: argparse.ArgumentParser, images: bool = False) -> None:
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="the texts (or --input FILE)")
    if images:
        parser.add_argument(
            "--image",
            action="append",
            default=[],
            metavar="FILE",
            help="an image whose text (read by OCR, rows as 'label: value') is one more TEXT "
            "(repeatable; needs the vision extra)",
        )


def _verb(
    verbs: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    return verbs.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    """Register classify, extract, summarize, sentiment, topics and ask on `verbs`."""
    classify = _verb(
        verbs, "classify", "label texts with one of a fixed set of labels", CLASSIFY_DESCRIPTION
    )
    _add_texts(classify, images=True)
    classify.add_argument(
        "--labels",
        default=None,
        metavar="A,B,C",
        help="the labels, separated by commas (a label with a comma: --labels-file)",
    )
    classify.add_argument(
        "--labels-file",
        default=None,
        metavar="FILE",
        help='a JSON file: a list of labels, or {"label": "description", ...}',
    )
    classify.add_argument(
        "--example",
        action="append",
        default=[],
        metavar="TEXT=>LABEL",
        help="a few-shot example (repeatable)",
    )
    classify.add_argument(
        "--examples-file",
        default=None,
        metavar="FILE",
        help='few-shot examples, a JSONL file of {"text": ..., "label": ...}',
    )
    classify.add_argument("--instruction", default=None, help="the task, in your words")
    classify.add_argument(
        "--method",
        choices=("auto", "llm", "embedding"),
        default="auto",
        help="llm: the model's constrained answer; embedding: the examples' vote; auto "
        "(default): the vote, with the model asked when the vote is unsure",
    )
    _add_batch(classify)
    _add_common(classify)
    classify.set_defaults(run=run_classify)

    extract = _verb(verbs, "extract", "pull fields out of texts as JSON", EXTRACT_DESCRIPTION)
    _add_texts(extract, images=True)
    extract.add_argument(
        "--fields",
        action="append",
        default=[],
        metavar='"NAME: DESCRIPTION"',
        help="a field to extract, a string (repeatable)",
    )
    extract.add_argument(
        "--schema",
        default=None,
        metavar="FILE",
        help='a JSON file: an object schema, or {"name": "description", ...}',
    )
    extract.add_argument(
        "--examples-file",
        default=None,
        metavar="FILE",
        help='few-shot examples, a JSONL file of {"text": ..., "record": {...}} (or the '
        "record's fields beside text)",
    )
    extract.add_argument("--instruction", default=None, help="the task, in your words")
    extract.add_argument(
        "--max-tokens", type=int, default=512, metavar="N", help="per record (default: %(default)s)"
    )
    _add_batch(extract)
    _add_common(extract)
    extract.set_defaults(run=run_extract)

    summarize = _verb(
        verbs, "summarize", "summarize a text file of any length", SUMMARIZE_DESCRIPTION
    )
    summarize.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="the text ('-' or none: stdin)"
    )
    summarize.add_argument(
        "--style", choices=STYLES, default="paragraph", help="(default: %(default)s)"
    )
    summarize.add_argument(
        "--max-words",
        type=int,
        default=120,
        metavar="N",
        help="target length; CJK characters count as words (default: %(default)s)",
    )
    summarize.add_argument(
        "--context-tokens",
        type=int,
        default=None,
        metavar="N",
        help="the model's window (default: what the endpoint reports, else 4096)",
    )
    _add_common(summarize)
    summarize.set_defaults(run=run_summarize)

    sentiment = _verb(
        verbs, "sentiment", "positive / neutral / negative with a score", SENTIMENT_DESCRIPTION
    )
    _add_texts(sentiment)
    sentiment.add_argument(
        "--per-sentence", action="store_true", help="one result per sentence of each text"
    )
    _add_batch(sentiment)
    _add_common(sentiment)
    sentiment.set_defaults(run=run_sentiment)

    topics = _verb(verbs, "topics", "find the topics in a collection of texts", TOPICS_DESCRIPTION)
    topics.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help="the texts: .jsonl, .csv (a header row) or .txt (one text a line); '-' reads "
        "JSONL from stdin",
    )
    topics.add_argument(
        "--text-field",
        default=TEXT_FIELD,
        metavar="NAME",
        help="the field or column holding the text (default: %(default)s)",
    )
    topics.add_argument("--k", type=int, default=None, help="topics (default: chosen by the data)")
    topics.add_argument(
        "--max-topics", type=int, default=8, metavar="N", help="(default: %(default)s)"
    )
    topics.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    _add_common(topics, embeddings=True)
    topics.set_defaults(run=run_topics)

    ask = _verb(verbs, "ask", "answer a question from your indexed documents", ASK_DESCRIPTION)
    ask.add_argument("question")
    ask.add_argument(
        "--index",
        default=None,
        metavar="FILE",
        help="the index file, as `sorai index` made it (default: $SORAI_HOME/index/default.sqlite)",
    )
    ask.add_argument("-k", type=int, default=5, help="passages to read (default: %(default)s)")
    ask.add_argument("--mode", choices=MODES, default="hybrid", help="(default: %(default)s)")
    _add_common(ask, embeddings=True)
    ask.set_defaults(run=run_ask)


# -- shared machinery -----------------------------------------------------------------------


def _texts_or_input(args: argparse.Namespace) -> None:
    images = getattr(args, "image", None) or []
    if images and args.input is not None:
        raise SkillError("give --image FILE or --input FILE, not both")
    if images:
        from sorai.vision.render import image_file_text

        args.texts = [*args.texts, *(image_file_text(path) for path in images)]
    if args.input is not None and args.texts:
        raise SkillError("give TEXT arguments or --input FILE, not both")
    if args.input is None and not args.texts:
        raise SkillError("nothing to do: give TEXT arguments or --input FILE")
    for n, text in enumerate(args.texts, 1):
        if not text.strip():  # before connecting: starting the server takes seconds
            raise SkillError(f"TEXT argument {n} is empty")
    if args.output is not None and args.input is None:
        raise SkillError("--output goes with --input (batch mode); --json prints JSON")
    if args.input is not None and args.input != "-" and not Path(args.input).is_file():
        raise SkillError(f"no such file: {args.input}")
    if args.output is not None and not Path(args.output).absolute().parent.is_dir():
        raise SkillError(f"cannot write {args.output}: no such directory")


def _batch(args: argparse.Namespace, client, work: Callable[[str], dict[str, Any]]) -> int:
    """`work` over each row of --input; each row plus its result as one JSON line to --output
    (or stdout). Bad rows are reported and counted; exit 1 if any."""
    from sorai.apps.client import ClientError  # here: the openai client loads slowly

    try:
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    except OSError as e:
        raise SkillError(f"cannot write {args.output}: {e.strerror or e}") from None
    done = failed = 0
    try:
        for item in read_rows(args.input, args.text_field):
            if item.error is None:
                try:
                    result = work(item.text)
                except SoraiError as e:
                    if isinstance(e, ClientError) and e.fatal:
                        raise
                    item.error = str(e)
            if item.error is not None:
                say(f"{item.where}: {item.error}")
                failed += 1
                continue
            out.write(json.dumps({**item.row, **result}, ensure_ascii=False) + "\n")
            out.flush()
            done += 1
    finally:
        if args.output:
            out.close()
    where = f" -> {args.output}" if args.output else ""
    say(f"{done} done, {failed} failed{where}")
    return 1 if failed else 0


def _classify_labels(args: argparse.Namespace) -> list[str] | dict[str, str]:
    if args.labels is not None and args.labels_file is not None:
        raise SkillError("give --labels or --labels-file, not both")
    if args.labels is not None:
        return [name.strip() for name in args.labels.split(",") if name.strip()]
    if args.labels_file is not None:
        labels = read_json(args.labels_file, "labels file")
        if isinstance(labels, list) and all(isinstance(name, str) for name in labels):
            return labels
        if isinstance(labels, dict) and all(isinstance(d, str) for d in labels.values()):
            return labels
        raise SkillError(
            f'{args.labels_file}: labels are a JSON list of names or {{"label": "description"}}'
        )
    raise SkillError("classify needs labels: --labels A,B,C or --labels-file FILE")


def _classify_examples(args: argparse.Namespace) -> list[tuple[str, str]]:
    examples = []
    for example in args.example:
        text, arrow, label = example.rpartition("=>")
        if not arrow or not text.strip() or not label.strip():
            raise SkillError(f"--example takes TEXT=>LABEL, got {example!r}")
        examples.append((text.strip(), label.strip()))
    if args.examples_file is not None:
        for where, value in read_jsonl(args.examples_file):
            if (
                not isinstance(value, dict)
                or not isinstance(value.get("text"), str)
                or not isinstance(value.get("label"), str)
            ):
                raise SkillError(f'{where}: an example is {{"text": "...", "label": "..."}}')
            examples.append((value["text"], value["label"]))
    return examples


def run_classify(args: argparse.Namespace) -> int:
    from sorai.apps.skills import classify as skill

    _texts_or_input(args)
    labels = _classify_labels(args)
    named = skill._labels(labels)  # the labels' and examples' errors before connecting
    examples = _classify_examples(args)
    instruction = args.instruction or skill.INSTRUCTION
    skill.messages("", named, examples, instruction)
    method = args.method
    vote = None

    def work(text: str) -> dict[str, Any]:
        result = skill.classify(client, text, labels, examples, instruction, method, vote)
        return {"label": result.label, "confidence": result.confidence, "scores": result.scores}

    with connect(args) as client:
        if method == "embedding" or (method == "auto" and examples):
            vote = skill.fit_vote(client, named, examples)  # once for every text
        if args.input is not None:
            return _batch(args, client, work)
        results = [
            skill.classify(client, t, labels, examples, instruction, method, vote)
            for t in args.texts
        ]
    if args.json:
        print_json([asdict(r) for r in results])
        return 0
    columns = max(width(name) for name in named)
    for r in results:
        confidence = f"{r.confidence:.3f}" if r.confidence is not None else "  -  "
        print(f"{pad(r.label, columns)}  {confidence}  {short(r.text)}")
    return 0


# -- extract --------------------------------------------------------------------------------


def _extract_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.fields and args.schema is not None:
        raise SkillError("give --fields or --schema, not both")
    if args.schema is not None:
        fields = read_json(args.schema, "schema")
        if not isinstance(fields, dict):
            raise SkillError(f'{args.schema}: a JSON object schema or {{"name": "description"}}')
        return fields
    if not args.fields:
        raise SkillError('extract needs fields: --fields "name: description" or --schema FILE')
    fields = {}
    for spec in args.fields:
        name, _, description = spec.partition(":")
        if not name.strip():
            raise SkillError(f'--fields takes "NAME: DESCRIPTION", got {spec!r}')
        if name.strip() in fields:
            raise SkillError(f"field {name.strip()!r} given twice")
        fields[name.strip()] = description.strip()
    return fields


def _extract_examples(path: str | None) -> list[tuple[str, dict[str, Any]]]:
    examples: list[tuple[str, dict[str, Any]]] = []
    if path is None:
        return examples
    for where, value in read_jsonl(path):
        if not isinstance(value, dict) or not isinstance(value.get("text"), str):
            raise SkillError(f'{where}: an example is {{"text": "...", "record": {{...}}}}')
        record = value.get("record", {k: v for k, v in value.items() if k != "text"})
        if not isinstance(record, dict):
            raise SkillError(f"{where}: the example's record is not a JSON object")
        examples.append((value["text"], record))
    return examples


def run_extract(args: argparse.Namespace) -> int:
    import jsonschema

    from sorai.apps.skills import extract as skill

    _texts_or_input(args)
    fields = _extract_fields(args)
    schema = skill.fields_schema(fields)  # the fields' and examples' errors before connecting
    examples = _extract_examples(args.examples_file)
    validator = jsonschema.Draft202012Validator(schema)
    for text, record in examples:
        error = next(iter(validator.iter_errors(record)), None)
        if error is not None:
            raise SkillError(
                f"example {short(text, 40)!r}: the record does not fit: {error.message}"
            )
    instruction = args.instruction or skill.INSTRUCTION

    def one(text: str) -> dict[str, Any]:
        return skill.extract(client, text, fields, examples, instruction, args.max_tokens)

    with connect(args) as client:
        if args.input is not None:
            return _batch(args, client, lambda text: {"record": one(text)})
        records = [one(text) for text in args.texts]
    if args.json:
        print_json([{"text": t, "record": r} for t, r in zip(args.texts, records, strict=True)])
        return 0
    for n, record in enumerate(records):
        if n:
            print()
        for name, value in record.items():
            shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            print(f"{name}: {shown}")
    return 0


# -- summarize ------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    from sorai.apps.rag.ingest import decode_text, read_document

    if path == "-":
        if sys.stdin.isatty():
            raise SkillError("give a FILE, or pipe the text on stdin")
        return sys.stdin.read()
    file = Path(path)
    if not file.is_file():
        raise SkillError(f"no such file: {path}")
    if file.suffix.lower() in (".html", ".htm", ".pdf"):
        return read_document(file).text  # DocumentError (a SoraiError) names what is wrong
    try:
        return decode_text(file.read_bytes())
    except OSError as e:
        raise SkillError(f"cannot read {path}: {e.strerror or e}") from None
    except SoraiError as e:
        raise SkillError(f"{path}: {e}") from None


def run_summarize(args: argparse.Namespace) -> int:
    from sorai.apps.skills.summarize import summarize

    if args.max_words < 1:
        raise SkillError(f"--max-words must be at least 1, got {args.max_words}")
    text = _read_text(args.file)
    if not text.strip():
        raise SkillError(f"nothing to summarize: {args.file} is empty")
    with connect(args) as client:
        summary = summarize(client, text, args.style, args.max_words, args.context_tokens)
    if args.json:
        print_json({"file": args.file, **asdict(summary)})
        return 0
    print(summary.text)
    chunks = plural(summary.chunks, "chunk")
    how = "one request" if summary.path == "direct" else f"map-reduce over {chunks}"
    if summary.extractive:
        how += "; the source's own key sentences: the model's summary failed the checks"
    if summary.dropped:
        how += f"; {plural(len(summary.dropped), 'sentence')} with a number not in the text dropped"
    say(f"({plural(summary.words, 'word')}; {how})")
    return 0


# -- sentiment ------------------------------------------------------------------------------


def run_sentiment(args: argparse.Namespace) -> int:
    from sorai.apps.skills.sentiment import sentiment, sentiment_by_sentence

    _texts_or_input(args)

    def fields(result) -> dict[str, Any]:
        return {"label": result.label, "score": result.score, "probabilities": result.probabilities}

    def work(text: str) -> dict[str, Any]:
        if args.per_sentence:
            return {"sentences": [asdict(s) for s in sentiment_by_sentence(client, text)]}
        return fields(sentiment(client, text))

    with connect(args) as client:
        if args.input is not None:
            return _batch(args, client, work)
        if args.per_sentence:
            results = [sentiment_by_sentence(client, text) for text in args.texts]
        else:
            results = [[sentiment(client, text)] for text in args.texts]
    if args.json:
        if args.per_sentence:
            print_json(
                [
                    {"text": text, "sentences": [asdict(s) for s in found]}
                    for text, found in zip(args.texts, results, strict=True)
                ]
            )
        else:
            print_json([asdict(found[0]) for found in results])
        return 0
    for n, found in enumerate(results):
        if n and args.per_sentence:
            print()
        for s in found:
            score = f"{s.score:+.2f}" if s.score is not None else "  -  "
            print(f"{s.label:<8}  {score}  {short(s.text, 70)}")
    return 0


# -- topics ---------------------------------------------------------------------------------


def run_topics(args: argparse.Namespace) -> int:
    from sorai.apps.skills.topics import topics

    if args.input != "-" and not Path(args.input).is_file():
        raise SkillError(f"no such file: {args.input}")
    texts: list[str] = []
    lines: list[str] = []
    failed = 0
    for item in read_rows(args.input, args.text_field):
        if item.error is not None:
            say(f"{item.where}: {item.error}")
            failed += 1
        else:
            texts.append(item.text)
            lines.append(item.where)
    if not texts:
        raise SkillError(f"no texts in {args.input}")
    with connect(args) as client:
        found = topics(client, texts, k=args.k, max_topics=args.max_topics, seed=args.seed)
    if args.json:
        print_json(
            [asdict(t) | {"lines": [lines[i] for i in t.members]} for t in found],
        )
    else:
        columns = max([width("TOPIC")] + [width(t.label) for t in found])
        print(f"{'COUNT':>5}  {pad('TOPIC', columns)}  EXAMPLES")
        for t in found:
            examples = t.examples[:2] or [texts[i] for i in t.members[:2]]
            first = short(examples[0], 60) if examples else ""
            print(f"{t.count:>5}  {pad(t.label, columns)}  {first}")
            for example in examples[1:]:
                print(f"{'':>5}  {'':{columns}}  {short(example, 60)}")
        bad = f", {plural(failed, 'bad row')}" if failed else ""
        say(f"{plural(len(texts), 'text')}, {plural(len(found), 'topic')}{bad}")
    return 1 if failed else 0


# -- ask ------------------------------------------------------------------------------------


def run_ask(args: argparse.Namespace) -> int:
    from sorai.apps.rag.store import Index
    from sorai.apps.skills.ask import DONT_KNOW, ask

    if not args.question.strip():
        raise SkillError("the question is empty")
    with Index(args.index, create=False) as index:
        with connect(args, embedding_model=index.embedding_model) as client:
            answer = ask(client, args.question, index, k=args.k, mode=args.mode)
        path = index.path
    if args.json:
        print_json(asdict(answer))
        return 0
    if answer.text == DONT_KNOW:  # nothing relevant was retrieved: the model was not asked
        print(f"No relevant passage was found in {path} for this question.")
        return 0
    print(answer.text)
    if not answer.found:  # relevant passages, none holding the answer
        return 0
    if answer.citations:
        print()
    for c in answer.citations:
        where = shown(c.path) + (f", p.{c.page}" if c.page else "")
        where += f" § {c.heading}" if c.heading else ""
        print(f"[{c.number}] {where}: {short(c.text, 100)}")
    return 0
