"""Question-answering data for RULER's QA tasks (qa_1: SQuAD, qa_2: HotpotQA).

RULER builds a long context from the golden document(s) of a question plus distractor
documents taken from the other questions of the same dataset, and asks the question after the
documents. Here the data is a user-supplied file in either dataset's published format:

* SQuAD (v1.1 or v2.0) JSON: ``{"data": [{"paragraphs": [{"context": ..., "qas":
  [{"question": ..., "answers": [{"text": ...}], "is_impossible": ...}]}]}]}``;
  unanswerable questions are skipped;
* HotpotQA JSON (a list) or jsonl (one item per line): ``{"question": ..., "answer": ...,
  "context": [[title, [sentence, ...]], ...]}``; every paragraph of an item is one of its
  documents (the distractor setting's two supporting and eight distracting paragraphs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Question:
    """One question, its accepted answers and the indices of its own documents."""

    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]


@dataclass
class QAData:
    """The questions and the document pool of one QA file."""

    kind: str  # "squad" | "hotpotqa"
    path: str
    questions: list[Question]
    docs: list[str]

    @property
    def task(self) -> str:
        """The RULER task this file feeds."""
        return f"qa_{self.kind}"


def _load(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON (line {err.lineno}: {err.msg})") from None


def _squad(path: Path, data: dict) -> QAData:
    docs: list[str] = []
    questions: list[Question] = []
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(para.get("context"), str):
                raise ValueError(f"{where}: no string 'context'")
            docs.append(para["context"])
            for q in para.get("qas", []):
                answers = tuple(
                    dict.fromkeys(x["text"] for x in q.get("answers", []) if x.get("text"))
                )
                if q.get("is_impossible") or not answers:
                    continue
                if not isinstance(q.get("question"), str):
                    raise ValueError(f"{where}: a question without a string 'question'")
                questions.append(Question(q["question"], answers, (len(docs) - 1,)))
    return QAData("squad", str(path), questions, docs)


def _hotpotqa(path: Path, items: list) -> QAData:
    docs: list[str] = []
    questions: list[Question] = []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ValueError(f"{where}: no string 'question'")
        if not isinstance(item.get("answer"), str) or not isinstance(item.get("context"), list):
            raise ValueError(f"{where}: needs a string 'answer' and a list 'context'")
        gold = []
        for para in item["context"]:
            if not (isinstance(para, list) and len(para) == 2 and isinstance(para[1], list)):
                raise ValueError(f"{where}: 'context' entries must be [title, [sentences]]")
            docs.append(f"{para[0]}\n{''.join(para[1]).strip()}")
            gold.append(len(docs) - 1)
        if item["answer"] and gold:
            questions.append(Question(item["question"], (item["answer"],), tuple(gold)))
    return QAData("hotpotqa", str(path), questions, docs)


def read_qa_file(path: str | Path) -> QAData:
    """Read a SQuAD or HotpotQA file (the format is recognised from its structure)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    data = _load(path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        qa = _squad(path, data)
    elif isinstance(data, list):
        qa = _hotpotqa(path, data)
    else:
        raise ValueError(
            f"{path}: neither SQuAD ({{'data': [...]}}) nor HotpotQA (a list of items) format"
        )
    if not qa.questions:
        raise ValueError(f"{path}: no answerable question")
    if len(qa.docs) < 2:
        raise ValueError(
            f"{path}: needs at least two documents (distractors come from the other questions)"
        )
    return qa
