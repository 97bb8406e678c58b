"""``tools/evaluate.py lm-eval``: standard benchmarks through lm-evaluation-harness (paper
Tables 1, 2 and 9).

A thin wrapper: the loaded model (with ``--no-ltm`` applied, if given) is handed to lm-eval's
``HFLM`` as a model instance with its tokenizer, ``lm_eval.simple_evaluate`` runs the given
tasks, and every reported metric becomes a row (fractions in [0, 1] such as ``acc`` are stored
in percent, as the paper's tables). Task definitions come from lm-eval's registry or from
``--include-path`` directories of task YAML files. Datasets must already be on disk (the Hugging
Face datasets cache, or local files named in the YAML); ``--offline`` forbids downloads.

The same run without this wrapper (documented in docs/evaluation.md)::

    lm_eval --model hf --model_args pretrained=exports/mm,trust_remote_code=True,dtype=float32 \\
        --tasks arc_easy,piqa --batch_size 8 --output_path results/
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mm_megatron.eval.loading import EvalError

DESCRIPTION = "standard benchmarks through lm-evaluation-harness (local datasets)"
PERCENT_METRICS = {
    "acc",
    "acc_norm",
    "exact_match",
    "em",
    "f1",
    "mc1",
    "mc2",
    "pass@1",
    "contains",
    "bleu_acc",
    "rouge1_acc",
}


def add_args(p: argparse.ArgumentParser) -> None:
    """The suite's options."""
    p.add_argument("--tasks", required=True, help="comma list of lm-eval task (or group) names")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="a directory of task YAML files (repeatable)",
    )
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument(
        "--limit",
        type=float,
        help="examples per task (an integer), or a fraction of each task if < 1",
    )
    p.add_argument("--batch-size", default="1", help="an integer or 'auto'")
    p.add_argument(
        "--max-length",
        type=int,
        help="longest input in tokens (default: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="no network: set HF_HUB_OFFLINE and HF_DATASETS_OFFLINE",
    )
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="keep lm-eval's per-sample records in the result file",
    )


def validate(args: argparse.Namespace) -> None:
    """Check the options and that every task is known, before the model loads."""
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.task_list:
        raise EvalError("--tasks: empty list")
    for path in args.include_path:
        if not Path(path).is_dir():
            raise EvalError(f"--include-path {path}: not a directory")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise EvalError(f"--num-fewshot: must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and (args.limit <= 0 or (args.limit >= 1 and args.limit % 1)):
        raise EvalError(f"--limit: a positive integer or a fraction below 1, got {args.limit}")
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        raise EvalError(f"--batch-size: a positive integer or 'auto', got {args.batch_size!r}")
    if args.max_length is not None and args.max_length < 1:
        raise EvalError(f"--max-length: must be >= 1, got {args.max_length}")
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path or None)
    known = set(manager.all_tasks)
    unknown = [t for t in args.task_list if t not in known]
    if unknown:
        raise EvalError(
            f"--tasks: unknown to lm-eval: {', '.join(unknown)} (add its YAML "
            "directory with --include-path)"
        )
    args.task_manager = manager


def metric_rows(results: dict[str, Any], n_samples: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric) of lm-eval's ``results``; stderr beside the score."""
    rows = []
    for task, metrics in results.items():
        n = n_samples.get(task, {}).get("effective") if isinstance(n_samples, dict) else None
        for key, value in metrics.items():
            skip = key in ("alias", "sample_len") or "_stderr" in key
            if skip or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            scale = 100.0 if name in PERCENT_METRICS else 1.0
            stderr = metrics.get(f"{name}_stderr,{filt}") if filt else None
            rows.append(
                {
                    "task": task,
                    "metric": name if filt in ("", "none") else key,
                    "score": scale * value,
                    "n": n,
                    "stderr": scale * stderr if isinstance(stderr, (int, float)) else None,
                }
            )
    return rows


def run(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on the loaded model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    max_length = args.max_length or getattr(model.config, "max_position_embeddings", None)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch,
        max_length=max_length,
        device=str(next(model.parameters()).device),
    )
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=args.task_list,
        num_fewshot=args.num_fewshot,
        limit=limit,
        task_manager=args.task_manager,
        log_samples=args.log_samples,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    if res is None:
        raise EvalError("lm-eval returned no results")
    details: dict[str, Any] = {
        "lm_eval_version": getattr(lm_eval, "__version__", "?"),
        "versions": res.get("versions", {}),
        "n-samples": res.get("n-samples", {}),
        "n-shot": res.get("n-shot", {}),
        "groups": res.get("groups", {}),
    }
    if args.log_samples:
        details["samples"] = res.get("samples", {})
    return {"rows": metric_rows(res["results"], res.get("n-samples", {})), "details": details}
