"""`sorai batch submit|status|cancel|results`: a thin command line over /v1/files and
/v1/batches of a running server (`sorai serve`, or any OpenAI-compatible endpoint)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import openai

from sorai.apps.client import find_endpoint
from sorai.apps.command import say
from sorai.errors import SoraiError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")

DESCRIPTION = """\
Batches run on the server, at a lower priority than interactive requests, and survive its
restarts: submit a JSONL file of requests, check on it later, read the results.

examples:
  sorai batch submit requests.jsonl           # prints the batch id
  sorai batch status batch_0123...
  sorai batch results batch_0123... > out.jsonl
  sorai batch results batch_0123... --errors  # the error file (bad lines, failed requests)
  sorai batch cancel batch_0123...
"""


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "batch",
        help="run a JSONL file of requests as a batch on a running server",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run, batch_parser=parser)
    actions = parser.add_subparsers(dest="batch_action", metavar="<action>")
    submit = actions.add_parser("submit", help="upload a JSONL file and start a batch on it")
    submit.add_argument("file", type=Path)
    submit.add_argument(
        "--endpoint",
        default=ENDPOINTS[0],
        choices=ENDPOINTS,
        help="where lines without a url go (default: /v1/chat/completions)",
    )
    submit.add_argument(
        "--window", default="24h", help="completion window, e.g. 24h, 30m (default: 24h)"
    )
    for name, text in (("status", "a batch's state"), ("cancel", "stop a batch")):
        action = actions.add_parser(name, help=text)
        action.add_argument("batch_id")
    results = actions.add_parser("results", help="print a finished batch's output file")
    results.add_argument("batch_id")
    results.add_argument("--errors", action="store_true", help="print the error file instead")
    for action in actions.choices.values():
        action.add_argument("--url", default=None, help="the server (default: as other verbs)")
        action.add_argument("--api-key", default=None, metavar="KEY")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.batch_action is None:
        args.batch_parser.print_help()
        return 2
    client = _client(args)
    try:
        if args.batch_action == "submit":
            upload = client.files.create(file=args.file.open("rb"), purpose="batch")
            batch = client.batches.create(
                input_file_id=upload.id,
                endpoint=args.endpoint,
                completion_window=args.window,
            )
            print(batch.id)
        elif args.batch_action == "status":
            _status(client.batches.retrieve(args.batch_id))
        elif args.batch_action == "cancel":
            _status(client.batches.cancel(args.batch_id))
        else:
            batch = client.batches.retrieve(args.batch_id)
            file_id = batch.error_file_id if args.errors else batch.output_file_id
            if file_id is None:
                which = "error" if args.errors else "output"
                raise SoraiError(f"batch {batch.id} is {batch.status} and has no {which} file")
            sys.stdout.write(client.files.content(file_id).text)
    except FileNotFoundError as exc:
        raise SoraiError(f"cannot read {exc.filename}: no such file") from None
    except openai.APIStatusError as exc:
        raise SoraiError(f"the server answered {exc.status_code}: {exc.message}") from None
    except openai.APIConnectionError:
        raise SoraiError(f"cannot reach the server at {client.base_url}") from None
    return 0


def _client(args: argparse.Namespace) -> openai.OpenAI:
    endpoint = find_endpoint(args.url, args.api_key)
    if endpoint.url is None:
        # A batch outlives this command: it needs a server that keeps running.
        raise SoraiError(
            "sorai batch needs a running server: start `sorai serve`, or name one with --url "
            "or $SORAI_URL"
        )
    say(endpoint.status)
    return openai.OpenAI(base_url=endpoint.url, api_key=endpoint.api_key or "none", max_retries=0)


def _status(batch) -> None:  # noqa: ANN001 (openai's Batch)
    counts = batch.request_counts
    done = f"{counts.completed + counts.failed}/{counts.total}" if counts else "0/0"
    line = f"{batch.id}: {batch.status}, {done} lines done"
    if counts and counts.failed:
        line += f" ({counts.failed} failed)"
    print(line)
