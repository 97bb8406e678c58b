"""Many-shot in-context learning: prompts, label variants and loglikelihood scoring.

Reproduces the protocol of the paper's §5.3 (Figures 3-7, App. I), adopted from LongICLBench
(Li et al. 2024): demonstrations "input: ... label: ..." followed by a query, with

* real (semantic) labels, or anonymised labels ``class_00``, ``class_01``, ... assigned to the
  classes by a seeded permutation;
* k shots, where a shot is one demonstration per class (the paper's unit; ``--shot-unit
  total`` counts demonstrations instead);
* four prompt templates: the delimiter between input and label is a space or a line break,
  and the demonstrations of each shot are in a fixed class order or shuffled. As in the paper,
  the best template is reported for each (labels, k): an oracle choice on the test accuracy.

The prediction is the label whose tokens have the highest log-likelihood after the prompt
(``acc``; ``acc_norm`` divides by the number of label tokens), so no generation is needed.
The demonstrations are prefilled once per (labels, k, template) and the cache is copied for
every query, then for every batch of candidate labels.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mm_megatron.eval.icl_data import Example
from mm_megatron.eval.prefill import Prefilled, forward_chunks, prefill, score_continuations


@dataclass(frozen=True)
class Template:
    """A prompt variant: the input/label delimiter and the order within a shot."""

    name: str
    delimiter: str
    shuffle: bool

    @property
    def separator(self) -> str:
        """Between two demonstrations."""
        return "\n\n" if self.delimiter == "\n" else "\n"


TEMPLATES: dict[str, Template] = {
    "space-ordered": Template("space-ordered", " ", False),
    "space-shuffled": Template("space-shuffled", " ", True),
    "newline-ordered": Template("newline-ordered", "\n", False),
    "newline-shuffled": Template("newline-shuffled", "\n", True),
}
LABEL_MODES = ("real", "anonymous")


def label_names(labels: Sequence[str], mode: str, seed: int) -> dict[str, str]:
    """The string shown for each label: itself, or ``class_NN`` by a seeded permutation."""
    if mode == "real":
        return {lab: lab for lab in labels}
    if mode != "anonymous":
        raise ValueError(f"unknown label mode {mode!r}")
    order = list(labels)
    random.Random(f"anon:{seed}").shuffle(order)
    width = max(2, len(str(len(order) - 1)))
    return {lab: f"class_{i:0{width}d}" for i, lab in enumerate(order)}


def select_demonstrations(
    train: Sequence[Example],
    labels: Sequence[str],
    shots: int,
    unit: str,
    template: Template,
    seed: int,
) -> list[Example]:
    """The demonstrations for k = ``shots``: shot by shot, one example of every class per shot
    (``unit`` "per-class"), or ``shots`` examples cycling over the classes ("total"). The same
    examples for every template of a seed; only their order within a shot changes."""
    rng = random.Random(f"demos:{seed}:{shots}:{unit}")
    by_class = {lab: [e for e in train if e.label == lab] for lab in labels}
    for pool in by_class.values():
        rng.shuffle(pool)
    class_order = list(labels)
    rng.shuffle(class_order)
    n_shots = shots if unit == "per-class" else -(-shots // len(labels))
    short = [lab for lab in labels if len(by_class[lab]) < n_shots]
    if short:
        raise ValueError(
            f"class {short[0]!r} has {len(by_class[short[0]])} training examples, "
            f"fewer than {n_shots} shots"
        )
    demos: list[Example] = []
    order_rng = random.Random(f"order:{seed}:{shots}")
    for s in range(n_shots):
        shot = [by_class[lab][s] for lab in class_order]
        if template.shuffle:
            order_rng.shuffle(shot)
        demos += shot
    return demos[:shots] if unit == "total" else demos


INSTRUCTION = "Classify each input into one of the categories shown in the examples."


def format_example(
    text: str,
    label: str | None,
    template: Template,
    input_name: str = "input",
    label_name: str = "category",
) -> str:
    """``input: TEXT<delim>category: LABEL`` (or ending at ``category:`` for a query)."""
    head = f"{input_name}: {text}{template.delimiter}{label_name}:"
    return head if label is None else f"{head} {label}"


def context_text(
    demos: Sequence[Example],
    names: dict[str, str],
    template: Template,
    input_name: str = "input",
    label_name: str = "category",
) -> str:
    """The instruction and the demonstrations, ending with the separator before a query."""
    parts = [
        format_example(d.text, names[d.label], template, input_name, label_name) for d in demos
    ]
    return INSTRUCTION + template.separator + "".join(p + template.separator for p in parts)


@dataclass
class Prediction:
    """The scores of every candidate label for one query."""

    gold: str
    scores: dict[str, float]  # label -> sum log-prob
    norm_scores: dict[str, float]  # label -> mean log-prob per token

    @property
    def predicted(self) -> str:
        return max(self.scores, key=self.scores.__getitem__)

    @property
    def predicted_norm(self) -> str:
        return max(self.norm_scores, key=self.norm_scores.__getitem__)


def classify(
    model: Any,
    context: Prefilled,
    query_ids: list[int],
    candidates: dict[str, list[int]],
    gold: str,
    chunk_size: int,
    batch_size: int,
) -> Prediction:
    """Score every candidate label after the prefilled context and the query."""
    cache, logits = forward_chunks(model, query_ids, chunk_size, copy.deepcopy(context.cache))
    state = Prefilled(cache, logits[-1].log_softmax(-1), context.length + len(query_ids))
    labels = list(candidates)
    scored = score_continuations(model, state, [candidates[lab] for lab in labels], batch_size)
    return Prediction(
        gold,
        {lab: s.logprob for lab, s in zip(labels, scored, strict=True)},
        {lab: s.logprob / s.num_tokens for lab, s in zip(labels, scored, strict=True)},
    )


def accuracy(predictions: Sequence[Prediction], norm: bool = False) -> float:
    """Fraction of queries whose best-scoring label is the gold one."""
    if not predictions:
        return float("nan")
    hits = [(p.predicted_norm if norm else p.predicted) == p.gold for p in predictions]
    return sum(hits) / len(hits)


def prefill_context(model: Any, ids: list[int], chunk_size: int) -> Prefilled:
    """Prefill the demonstrations once (the cache is copied for every query)."""
    return prefill(model, ids, chunk_size)
