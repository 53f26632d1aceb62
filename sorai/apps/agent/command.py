"""`sorai agent "task"`: a tool-using agent at the command line, over any endpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from sorai.apps.command import add_endpoint_args, connect, print_json, say, shown
from sorai.apps.text import plural
from sorai.errors import SoraiError

DESCRIPTION = """\
A model that calls tools until it can answer: each step is printed as it happens (stderr), the
answer goes to stdout, and the whole run is written as a JSON trace.

tools (--tools, comma-separated; groups: files, images):
  calculator                            arithmetic, evaluated safely (no eval)
  read_file, write_file, list_files     in the workspace only
  python                                code in a sandboxed process (the workspace is its only
                                        writable place; no network; time and memory limits)
  describe_image, crop_image, resize_image, rotate_image, grayscale, blur, watercolor,
  mark_regions                          image edits writing image/<id>_<tool>_<parent>.png
  search_documents                      passages of a `sorai index` (--index)

The file, image and python tools work in --workspace; without it, in a new empty directory
under $SORAI_HOME/agent/workspaces (printed at the start), so a run writes nowhere else.

examples:
  sorai agent "What is 1234 * 5678? Use the calculator." --tools calculator
  sorai agent "photo.png: make it grayscale and then watercolor" --workspace pics
  sorai agent "How many lines does data.csv have?" --tools files,python --strategy react \\
      --url http://127.0.0.1:8000/v1 --model a-larger-model
"""

DEFAULT_TOOLS = "calculator,files,images"


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "agent",
        help="a tool-using agent (ReAct or native tool calls)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("task", help="what to do")
    parser.add_argument(
        "--tools",
        default=DEFAULT_TOOLS,
        metavar="A,B",
        help="the tools it may use (default: %(default)s; python only when named)",
    )
    parser.add_argument(
        "--workspace",
        default=None,
        metavar="DIR",
        help="the directory the file, image and python tools are confined to (default: a new "
        "empty one under $SORAI_HOME/agent/workspaces)",
    )
    parser.add_argument(
        "--strategy",
        choices=("tools", "react"),
        default="tools",
        help="tools: the API's native tool calls, decoded under their schemas; react: "
        "Thought/Action/Observation text (default: %(default)s)",
    )
    parser.add_argument("--max-iterations", type=int, default=8, metavar="N")
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, metavar="S", help="(default: %(default)s)"
    )
    parser.add_argument("--system", default=None, metavar="TEXT", help="added instructions")
    parser.add_argument(
        "--index", default=None, metavar="FILE", help="search_documents' index (default: sorai's)"
    )
    parser.add_argument(
        "--trace-dir",
        default=None,
        metavar="DIR",
        help="where the JSON trace goes (default: $SORAI_HOME/agent/traces)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the steps")
    parser.add_argument("--json", action="store_true", help="print the whole trace as JSON")
    add_endpoint_args(parser, embeddings=True)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from sorai.apps.agent.agent import Agent
    from sorai.apps.agent.builtin import NEEDS_WORKSPACE, expand
    from sorai.apps.agent.trace import Printer

    # Everything that can be wrong with the options is found before a model is loaded.
    names = expand([n.strip() for n in args.tools.split(",") if n.strip()])
    if not names:
        raise SoraiError("--tools names no tool")
    if not args.task.strip():
        raise SoraiError("the task is empty")
    if args.max_iterations < 1:
        raise SoraiError(f"--max-iterations must be at least 1, got {args.max_iterations}")
    if not args.max_seconds > 0:
        raise SoraiError(f"--max-seconds must be positive, got {args.max_seconds:g}")
    workspace = None if args.workspace is None else Path(args.workspace).expanduser()
    needs_workspace = bool(set(names) & NEEDS_WORKSPACE)
    if needs_workspace and workspace is not None and not workspace.is_dir():
        raise SoraiError(f"--workspace {args.workspace} is not a directory")
    embedding_model = None
    if "search_documents" in names:
        from sorai.apps.rag.store import Index

        with Index(args.index, create=False) as index:
            embedding_model = index.embedding_model
    with connect(args, embedding_model=embedding_model) as client:
        if needs_workspace and workspace is None:
            # Not the current directory: a small model writes wherever it is let.
            from sorai.apps.agent.files import fresh_workspace

            workspace = fresh_workspace()
            say(f"workspace: {shown(str(workspace))} (new; --workspace DIR to work elsewhere)")
        agent = Agent(
            client,
            tools=names,
            strategy=args.strategy,
            workspace=workspace,
            system=args.system,
            max_iterations=args.max_iterations,
            max_seconds=args.max_seconds,
            trace_dir=args.trace_dir,
            on_step=None if args.quiet else Printer(),
            index=args.index,
        )
        trace = agent.run(args.task)
    if args.json:
        print_json(trace.to_dict())
    else:
        print(trace.answer)
    if not args.quiet:
        say(
            f"{plural(len(trace.tool_calls), 'tool call')}, {plural(len(trace.steps), 'step')}, "
            f"{trace.prompt_tokens}+{trace.completion_tokens} tokens, {trace.seconds:.1f} s, "
            f"stopped by {trace.stop_reason}; trace: {shown(trace.path or '')}"
        )
    return 0
