"""Public labelled QA samples for the benchmarks: the SQuAD, DROP and TriviaQA samples that the
allennlp 0.9.0 wheel ships as test fixtures (Apache-2.0 wheel; SQuAD and DROP CC BY-SA 4.0,
TriviaQA's evidence from Wikipedia and the web), downloaded with pip the first time into
~/.cache/sorai/bench/allennlp-0.9.0 (only the fixture files are kept).

Each question comes with its documents (the paragraph, passage or evidence files it was asked
over) and its answer strings; a document that holds none of another question's answers can
stand in as a document without the answer.
"""

from __future__ import annotations

import glob
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

BENCH = Path.home() / ".cache" / "sorai" / "bench"
ROOT = BENCH / "allennlp-0.9.0"
FIXTURES = "allennlp/tests/fixtures/data/"


@dataclass(frozen=True)
class Question:
    source: str  # squad | drop | triviaqa
    question: str
    answers: tuple[str, ...]  # any of them is the answer; numbers as digits
    documents: tuple[str, ...]  # names in documents()


def _fixtures() -> Path:
    data = ROOT / "data"
    if not (data / "squad.json").is_file():
        ROOT.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "allennlp==0.9.0"]
            + ["-d", str(ROOT), "-q"],
            check=True,
        )
        (wheel,) = glob.glob(str(ROOT / "allennlp-0.9.0-*.whl"))
        data.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in ("squad.json", "drop.json", "triviaqa-sample.tgz"):
                (data / name).write_bytes(z.read(FIXTURES + name))
        Path(wheel).unlink()
    return data


def load() -> tuple[dict[str, str], list[Question]]:
    """(document name -> text, the questions)."""
    data = _fixtures()
    documents: dict[str, str] = {}
    questions: list[Question] = []
    squad = json.loads((data / "squad.json").read_text())
    for article in squad["data"]:
        for n, paragraph in enumerate(article["paragraphs"]):
            name = f"squad/{article['title']}-{n}"
            documents[name] = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                questions.append(Question("squad", qa["question"], answers, (name,)))
    drop = json.loads((data / "drop.json").read_text())
    for key, item in drop.items():
        name = f"drop/{key}"
        documents[name] = item["passage"]
        for qa in item["qa_pairs"]:
            answer = qa["answer"]
            spans = tuple(answer.get("spans") or ())
            number = (answer.get("number") or "",)
            date = " ".join(v for v in (answer.get("date") or {}).values() if v)
            found = tuple(a for a in spans + number + (date,) if a)
            if found:
                questions.append(Question("drop", qa["question"], found, (name,)))
    with tarfile.open(data / "triviaqa-sample.tgz") as tar:
        files = {
            m.name: tar.extractfile(m).read().decode("utf-8", "replace")  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile() and not m.name.endswith(".swp")
        }
    seen: set[str] = set()
    for name in sorted(n for n in files if n.startswith("qa/")):
        for item in json.load(io.StringIO(files[name]))["Data"]:
            own = []
            for page in item.get("EntityPages", []) + item.get("SearchResults", []):
                for folder in ("evidence/wikipedia/", "evidence/web/"):
                    path = folder + page["Filename"]
                    if path in files:
                        documents[f"triviaqa/{page['Filename']}"] = files[path]
                        own.append(f"triviaqa/{page['Filename']}")
            if item["Question"] in seen or not own:
                continue
            seen.add(item["Question"])
            answers = tuple(dict.fromkeys([item["Answer"]["Value"], *item["Answer"]["Aliases"]]))
            questions.append(Question("triviaqa", item["Question"], answers, tuple(own)))
    return documents, questions


def holds(text: str, answers: tuple[str, ...]) -> bool:
    """Whether the text holds one of the answers (case-insensitive; a number as a whole
    number, so "2" is not found in "1921")."""
    import re

    lowered = text.lower()
    for answer in answers:
        pattern = re.escape(answer.lower())
        if re.search(rf"(?<![\w.]){pattern}(?![\w])", lowered):
            return True
    return False


if __name__ == "__main__":
    docs, qs = load()
    print(f"{len(docs)} documents, {len(qs)} questions")
    for q in qs:
        print(f"  {q.source:8} {q.question[:70]!r} -> {q.answers[:2]} in {q.documents}")
