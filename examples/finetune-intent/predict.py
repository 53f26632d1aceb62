"""Classify every inquiry of a chat JSONL file (val.jsonl by default) and print the accuracy.

Run from the repository root, for the base model and then for the fine-tune:

  python examples/finetune-intent/predict.py
  python examples/finetune-intent/predict.py --adapter runs/finetune-intent/adapter
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import sorai

HERE = Path(__file__).resolve().parent


def read_chats(path: Path) -> list[list[dict[str, Any]]]:
    """The `messages` of every non-blank line of a chat JSONL file."""
    chats = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            chats.append(json.loads(line)["messages"])
    return chats


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (optional)")
    parser.add_argument("--data", type=Path, default=HERE / "val.jsonl", help="chat JSONL")
    args = parser.parse_args(argv)

    llm = sorai.load(args.model, adapter=args.adapter)

    chats = read_chats(args.data)
    correct = 0
    for messages in chats:
        # The last turn is the assistant's answer: the label the model should give.
        *prompt, answer = messages
        expected = answer["content"].strip()
        got = llm.chat(prompt, max_tokens=8, temperature=0).text.strip()
        ok = got == expected
        correct += ok
        mark = "ok " if ok else "BAD"
        print(f"{mark} expected={expected:<22} got={got!r:<26} {prompt[-1]['content']}")

    accuracy = correct / len(chats) if chats else 0.0
    print(f"accuracy: {correct}/{len(chats)} = {accuracy:.1%}")
    return accuracy


if __name__ == "__main__":
    main()
