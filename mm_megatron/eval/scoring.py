"""RULER's scoring: case-insensitive substring matching of the expected answers.

As in RULER (Hsieh et al. 2024, ``string_match_all`` and ``string_match_part``):

* ``all``: the fraction of the expected answers that occur in the prediction (every needle
  value, every variable name, every common word must be recalled);
* ``part``: 1 if any expected answer occurs in the prediction (QA: several accepted answers).

Scores are in percent, averaged over samples. The prediction is cleaned first: line breaks
become spaces, non-printable characters are dropped, surrounding blanks stripped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NON_PRINTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_prediction(text: str) -> str:
    """The prediction as RULER scores it: one line, printable characters, stripped."""
    return _NON_PRINTABLE.sub("", text.replace("\n", " ")).strip()


def match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction (0..1) of ``answers`` found in ``prediction`` (case-insensitive)."""
    if not answers:
        raise ValueError("no expected answers")
    pred = clean_prediction(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` is found in ``prediction`` (case-insensitive), else 0.0."""
    if not answers:
        raise ValueError("no expected answers")
    pred = clean_prediction(prediction).lower()
    return float(any(a.lower() in pred for a in answers))


METRICS = {"all": match_all, "part": match_part}
METRIC_NAMES = {"all": "string_match_all", "part": "string_match_part"}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """One sample's score (0..1) under ``metric`` ("all" or "part")."""
    return METRICS[metric](prediction, answers)


def mean_percent(scores: Sequence[float]) -> float:
    """The mean of per-sample scores (0..1) in percent; NaN for no samples."""
    return 100.0 * sum(scores) / len(scores) if scores else float("nan")
