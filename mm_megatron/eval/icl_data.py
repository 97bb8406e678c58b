"""Classification data for many-shot in-context learning, and a synthetic generator.

The paper's ICL tasks (Banking77, TACRED, GoEmotions, adopted from LongICLBench) are jsonl
files with one example per line: ``{"text": "...", "label": "..."}`` (field names are
options). ``tools/evaluate.py make-icl-data`` writes a synthetic file of the same shape for
tests and smoke runs: each class owns a few invented keywords, and an example mixes two of its
class's keywords with shared filler words, so the label is learnable from the demonstrations
alone.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from mm_megatron.eval.loading import EvalError
from mm_megatron.eval.ruler_text import KEY_WORDS, pseudo_words


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: str


def read_examples(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> list[Example]:
    """Examples of a jsonl file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            text, label = row.get(text_field), row.get(label_field)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{lineno}: no non-empty string field {text_field!r}")
            if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
                raise ValueError(
                    f"{path}:{lineno}: field {label_field!r} must be a non-empty "
                    "string or an integer"
                )
            out.append(Example(" ".join(text.split()), str(label)))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def synthetic_examples(
    classes: int = 8, per_class: int = 40, seed: int = 0, keywords: int = 4, filler: int = 4
) -> list[Example]:
    """A learnable synthetic classification set: label names are common words, each class
    owns ``keywords`` invented words, and every example holds two of them among ``filler``
    shared invented words (shuffled)."""
    if not 2 <= classes <= len(KEY_WORDS):
        raise ValueError(f"classes must be in [2, {len(KEY_WORDS)}], got {classes}")
    rng = random.Random(f"icl-synthetic:{seed}")
    names = rng.sample(KEY_WORDS, classes)
    words = pseudo_words(classes * keywords + 30, rng)
    own = {n: words[i * keywords : (i + 1) * keywords] for i, n in enumerate(names)}
    shared = words[classes * keywords :]
    out = []
    for name in names:
        for _ in range(per_class):
            tokens = rng.sample(own[name], 2) + rng.sample(shared, filler)
            rng.shuffle(tokens)
            out.append(Example(" ".join(tokens), name))
    rng.shuffle(out)
    return out


def write_examples(path: str | Path, examples: list[Example]) -> Path:
    """Write examples as jsonl (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples),
        encoding="utf-8",
    )
    tmp.replace(path)
    return path


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``make-icl-data``."""
    p.add_argument("--out", required=True, help="jsonl file to write")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    """Write the synthetic file."""
    if args.per_class < 1:
        raise EvalError(f"--per-class: must be >= 1, got {args.per_class}")
    try:
        examples = synthetic_examples(args.classes, args.per_class, args.seed)
    except ValueError as err:
        raise EvalError(f"--classes: {err}") from None
    if Path(args.out).is_dir():
        raise EvalError(f"--out {args.out}: is a directory")
    write_examples(args.out, examples)
    print(f"wrote {len(examples)} examples of {args.classes} classes to {args.out}")
    return 0
