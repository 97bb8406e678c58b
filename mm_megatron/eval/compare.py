"""``tools/evaluate.py compare``: result files side by side, and their plots.

    python tools/evaluate.py compare mm_ruler.json llama_ruler.json [--plots plots/]

The table has one line per (suite, task, setting, metric) and one score column per file,
labelled with the model's label (``--names`` overrides). With ``--plots DIR``, every task whose
rows carry an x value becomes one PNG per metric: accuracy vs context length (RULER, the
paper's Tables 3, 4, 13 as curves), accuracy vs number of shots (ICL, Figures 3-7), or any
x that another suite reports, one line per model and variant. Plotting needs matplotlib; the
table is printed first in any case.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from mm_megatron.eval.loading import EvalError
from mm_megatron.eval.results import fmt_score, read_result, render_table, setting


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``compare``."""
    p.add_argument("files", nargs="+", help="result JSON files of tools/evaluate.py")
    p.add_argument("--names", help="comma list of column names, one per file")
    p.add_argument("--plots", help="directory for the PNG plots")


def _key(suite: str, row: dict[str, Any]) -> tuple:
    return (
        suite,
        row["task"],
        row.get("variant") or "",
        row.get("x_name") or "",
        row.get("x"),
        row["metric"],
    )


def load(files: list[str], names: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """(column name, document) per file; duplicate labels get a number."""
    docs = []
    for f in files:
        try:
            docs.append(read_result(f))
        except ValueError as err:
            raise EvalError(f"compare: {err}") from None
    if names is not None and len(names) != len(files):
        raise EvalError(f"--names: {len(names)} names for {len(files)} files")
    labels = names or [
        d.get("model", {}).get("label") or Path(f).stem for d, f in zip(docs, files, strict=True)
    ]
    # files of the same model (label) share a column unless they report the same numbers
    keys: dict[str, set] = {}
    out = []
    for label, doc in zip(labels, docs, strict=True):
        mine = {_key(doc["suite"], r) for r in doc["rows"]}
        name, k = label, 1
        while name in keys and keys[name] & mine:
            k += 1
            name = f"{label} #{k}"
        keys.setdefault(name, set()).update(mine)
        out.append((name, doc))
    return out


def merged(columns: list[tuple[str, dict[str, Any]]]) -> dict[tuple, dict[str, float]]:
    """(suite, task, variant, x_name, x, metric) -> {column: score}, in first-seen order."""
    table: dict[tuple, dict[str, float]] = {}
    for label, doc in columns:
        for row in doc["rows"]:
            table.setdefault(_key(doc["suite"], row), {})[label] = row["score"]
    return table


def comparison_table(columns: list[tuple[str, dict[str, Any]]]) -> str:
    """The side-by-side table as text."""
    labels = list(dict.fromkeys(c[0] for c in columns))
    lines = []
    for key, scores in merged(columns).items():
        suite, task, variant, x_name, x, metric = key
        row = {"variant": variant, "x_name": x_name, "x": x}
        lines.append(
            [suite, task, setting(row), metric] + [fmt_score(scores.get(lab)) for lab in labels]
        )
    return render_table(["suite", "task", "setting", "metric", *labels], lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def plot_series(columns: list[tuple[str, dict[str, Any]]]) -> dict[tuple, dict[str, list]]:
    """(suite, task, x_name, metric) -> {curve name: [(x, score), ...]} for rows with an x."""
    series: dict[tuple, dict[str, list]] = {}
    for label, doc in columns:
        for row in doc["rows"]:
            if row.get("x") is None or row["score"] is None:
                continue
            key = (doc["suite"], row["task"], row.get("x_name") or "x", row["metric"])
            curve = label + (f" ({row['variant']})" if row.get("variant") else "")
            series.setdefault(key, {}).setdefault(curve, []).append((row["x"], row["score"]))
    return series


def draw_plots(columns: list[tuple[str, dict[str, Any]]], out_dir: Path) -> list[Path]:
    """One PNG per (suite, task, metric) with an x axis; written atomically."""
    try:
        import matplotlib
    except ImportError:
        raise EvalError(
            "--plots: the Python package 'matplotlib' is not installed; install "
            "matplotlib to draw the PNG plots (the table above is complete)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (suite, task, x_name, metric), curves in plot_series(columns).items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for curve, points in curves.items():
            points = sorted(points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=curve)
        xs = sorted({p[0] for pts in curves.values() for p in pts})
        if len(xs) > 1 and xs[0] > 0 and xs[-1] / xs[0] >= 8:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(x_name)
        ax.set_ylabel(metric)
        ax.set_title(f"{suite}: {task}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{_slug(suite)}-{_slug(task)}-{_slug(metric)}.png"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=out_dir)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
            plt.close(fig)
        written.append(path)
    return written


def main(args: argparse.Namespace) -> int:
    """Print the table, then draw the plots if asked."""
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    columns = load(args.files, names)
    print(comparison_table(columns))
    if args.plots:
        if Path(args.plots).is_file():
            raise EvalError(f"--plots {args.plots}: is a file (give a directory)")
        for path in draw_plots(columns, Path(args.plots)):
            print(f"wrote {path}")
    return 0
