"""``tools/evaluate.py icl``: many-shot in-context classification (paper Figures 3-7, App. I).

For every label variant (real, anonymous) and number of shots k, each of the four templates
is evaluated on the same test queries; the rows report the best template's accuracy (the
paper's choice) and the mean over templates, with x = k. A k whose prompt would exceed
``--max-context`` tokens, or needs more training examples than a class has, is skipped and
listed in the details.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from mm_megatron.eval.icl import (
    LABEL_MODES,
    TEMPLATES,
    accuracy,
    classify,
    context_text,
    format_example,
    label_names,
    prefill_context,
    select_demonstrations,
)
from mm_megatron.eval.icl_data import read_examples
from mm_megatron.eval.loading import EvalError
from mm_megatron.eval.prefill import DEFAULT_CHUNK
from mm_megatron.eval.progress import SampleProgress
from mm_megatron.eval.suites import parse_int_list, parse_name_list

DESCRIPTION = "many-shot in-context classification, real vs anonymised labels"


def add_args(p: argparse.ArgumentParser) -> None:
    """The suite's options."""
    p.add_argument("--data", required=True, help="jsonl with 'text' and 'label' per line")
    p.add_argument(
        "--test-data", help="separate jsonl of test queries (default: held out from --data)"
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--name", help="task name in the results (default: the file's stem)")
    p.add_argument(
        "--shots",
        default="1,5,10,25,50,100,200,500",
        help="values of k; those whose prompt exceeds --max-context are skipped",
    )
    p.add_argument(
        "--shot-unit",
        choices=("per-class", "total"),
        default="per-class",
        help="a shot is one demonstration per class (the paper) or one in total",
    )
    p.add_argument("--labels", default="real,anonymous", help="label variants: real,anonymous")
    p.add_argument(
        "--templates",
        default=",".join(TEMPLATES),
        help=f"prompt templates, best reported: {', '.join(TEMPLATES)}",
    )
    p.add_argument("--test-size", type=int, default=200, help="test queries")
    p.add_argument(
        "--max-context",
        type=int,
        help="longest prompt in tokens (default: the model's max_position_embeddings)",
    )
    p.add_argument("--input-name", default="input", help="name of the input field in prompts")
    p.add_argument("--label-name", default="category", help="name of the label in prompts")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    p.add_argument("--batch-size", type=int, default=16, help="candidate labels per forward")


def validate(args: argparse.Namespace) -> None:
    """Check the options and read the data before the model loads."""
    args.shot_list = parse_int_list(args.shots, "--shots")
    args.label_modes = parse_name_list(args.labels, "--labels", list(LABEL_MODES))
    args.template_list = parse_name_list(args.templates, "--templates", list(TEMPLATES))
    for opt in ("test_size", "chunk_size", "batch_size"):
        if getattr(args, opt) < 1:
            raise EvalError(f"--{opt.replace('_', '-')}: must be >= 1, got {getattr(args, opt)}")
    if args.max_context is not None and args.max_context < 16:
        raise EvalError(f"--max-context: must be >= 16, got {args.max_context}")
    try:
        data = read_examples(args.data, args.text_field, args.label_field)
        test = (
            read_examples(args.test_data, args.text_field, args.label_field)
            if args.test_data
            else None
        )
    except ValueError as err:
        raise EvalError(f"--data/--test-data: {err}") from None
    rng = random.Random(f"split:{args.seed}")
    if test is None:
        order = list(range(len(data)))
        rng.shuffle(order)
        n_test = min(args.test_size, len(data) // 2)
        test = [data[i] for i in order[:n_test]]
        train = [data[i] for i in order[n_test:]]
    else:
        train = data
        test = rng.sample(test, min(args.test_size, len(test)))
    labels = sorted({e.label for e in train})
    if len(labels) < 2:
        raise EvalError(f"--data {args.data}: needs at least two labels, found {labels}")
    unknown = sorted({e.label for e in test} - set(labels))
    if unknown:
        raise EvalError(f"--test-data: labels {unknown[:5]} do not occur in the training data")
    args.train, args.test, args.label_set = train, test, labels
    args.task_name = args.name or Path(args.data).stem


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _evaluate_setting(
    model: Any, tokenizer: Any, args: argparse.Namespace, mode: str, shots: int, bar: SampleProgress
) -> dict[str, Any]:
    """All templates for one (label mode, k): per-template accuracies, or a skip reason."""
    loaded = args.loaded
    bos = [loaded.bos_id] if loaded.bos_id is not None else []
    names = label_names(args.label_set, mode, args.seed)
    candidates = {lab: _encode(tokenizer, " " + names[lab]) for lab in args.label_set}
    longest_label = max(len(c) for c in candidates.values())
    out: dict[str, Any] = {"templates": {}}
    for tname in args.template_list:
        template = TEMPLATES[tname]
        try:
            demos = select_demonstrations(
                args.train, args.label_set, shots, args.shot_unit, template, args.seed
            )
        except ValueError as err:
            return {"skipped": str(err), **out}
        ctx_ids = bos + _encode(
            tokenizer, context_text(demos, names, template, args.input_name, args.label_name)
        )
        queries = [
            _encode(
                tokenizer, format_example(e.text, None, template, args.input_name, args.label_name)
            )
            for e in args.test
        ]
        longest = len(ctx_ids) + max(len(q) for q in queries) + longest_label
        if longest > args.max_context_tokens:
            return {
                "skipped": f"prompt of {longest} tokens exceeds --max-context "
                f"{args.max_context_tokens}",
                **out,
            }
        start = time.perf_counter()
        context = prefill_context(model, ctx_ids, args.chunk_size)
        preds = []
        for example, q in zip(args.test, queries, strict=True):
            preds.append(
                classify(
                    model, context, q, candidates, example.label, args.chunk_size, args.batch_size
                )
            )
            bar.update()
        out["templates"][tname] = {
            "acc": accuracy(preds),
            "acc_norm": accuracy(preds, True),
            "context_tokens": len(ctx_ids),
            "demonstrations": len(demos),
            "seconds": round(time.perf_counter() - start, 3),
        }
    return out


def run(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every (label variant, k, template); rows of the best and mean template."""
    limit = args.max_context or getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        raise EvalError("--max-context: the model config has no max_position_embeddings; give it")
    args.max_context_tokens = limit
    per = len(args.template_list) * len(args.test)
    bar = SampleProgress(
        len(args.label_modes) * len(args.shot_list) * per, "icl", enabled=not args.quiet
    )
    rows: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    for mode in args.label_modes:
        for shots in args.shot_list:
            bar.note = f"{mode} labels, k={shots}"
            result = _evaluate_setting(model, tokenizer, args, mode, shots, bar)
            settings[f"{mode}/k={shots}"] = result
            if "skipped" in result:
                bar.update(per - len(result["templates"]) * len(args.test))
                continue
            accs = {t: r["acc"] for t, r in result["templates"].items()}
            best = max(accs, key=accs.__getitem__)
            common = {
                "task": args.task_name,
                "variant": f"{mode} labels",
                "x_name": "shots",
                "x": shots,
                "n": len(args.test),
            }
            rows.append(
                {
                    **common,
                    "metric": "acc (best template)",
                    "score": 100 * accs[best],
                    "template": best,
                    "context_tokens": result["templates"][best]["context_tokens"],
                }
            )
            rows.append(
                {
                    **common,
                    "metric": "acc (mean of templates)",
                    "score": 100 * sum(accs.values()) / len(accs),
                }
            )
    bar.close()
    return {
        "rows": rows,
        "details": {
            "settings": settings,
            "labels": args.label_set,
            "train_examples": len(args.train),
            "shot_unit": args.shot_unit,
            "max_context": limit,
        },
    }
