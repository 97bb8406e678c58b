"""Result files: one JSON document per run, and the table printed on stdout.

A result file is ``{"format": "mm-eval/1", "suite": ..., "model": {...}, "args": {...},
"created": ..., "seconds": ..., "rows": [...], "details": {...}}``. Each row is one number::

    {"task": "niah_single_1", "metric": "string_match_all", "score": 100.0, "n": 20,
     "x_name": "context length", "x": 4096, "variant": "..."}

``x``/``x_name`` (optional) is the quantity that a comparison plots on the horizontal axis
(context length, number of shots, ...); ``variant`` (optional) separates curves of the same
task (real vs anonymised labels, ...). Suites may add fields to a row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = "mm-eval/1"


def args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a run, as JSON values."""
    simple = (str, int, float, bool, type(None))
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if isinstance(value, simple):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, simple) for v in value):
            out[key] = list(value)
    return out


def make_document(
    suite: str,
    model: dict[str, Any],
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    details: dict[str, Any] | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """A result document (see the module docstring)."""
    return {
        "format": FORMAT,
        "suite": suite,
        "model": model,
        "args": args_dict(args),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": seconds,
        "rows": rows,
        "details": details or {},
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write ``document`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1, default=_json_default, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_result(path: str | Path) -> dict[str, Any]:
    """Read and check a result file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a result file of tools/evaluate.py (format {FORMAT})")
    for i, row in enumerate(doc.get("rows", [])):
        if not isinstance(row, dict) or not {"task", "metric", "score"} <= set(row):
            raise ValueError(f"{path}: rows[{i}] needs task, metric and score")
    return doc


def setting(row: dict[str, Any]) -> str:
    """The row's setting as text: ``variant, x_name=x``."""
    parts = []
    if row.get("variant"):
        parts.append(str(row["variant"]))
    if row.get("x") is not None:
        parts.append(f"{row.get('x_name', 'x')}={row['x']}")
    return ", ".join(parts)


def fmt_score(value: Any) -> str:
    """A score with two decimals; '-' for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def render_table(header: list[str], lines: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    out = [
        "  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    out += [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    return "\n".join(out)


def format_rows(document: dict[str, Any]) -> str:
    """The table of one result document."""
    model = document.get("model", {}).get("label", "?")
    lines = [
        [r["task"], setting(r), r["metric"], fmt_score(r["score"]), str(r.get("n", ""))]
        for r in document["rows"]
    ]
    title = f"{document['suite']}: {model}"
    if not lines:
        return title + "\n(no results: every setting was skipped; see 'details' in the file)"
    return title + "\n" + render_table(["task", "setting", "metric", "score", "n"], lines)
