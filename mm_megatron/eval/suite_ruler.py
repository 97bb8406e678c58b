"""``tools/evaluate.py ruler``: RULER-style long-context evaluation (paper Tables 3, 4, 10, 13).

For every task and context length, ``--samples`` prompts are generated deterministically
(:mod:`mm_megatron.eval.ruler`), prefilled in chunks through the model's cache, and answered by
greedy decoding on the cache (stopping at EOS or after the task's generation length). Each
answer is scored as RULER does (:mod:`mm_megatron.eval.scoring`). Rows: one per (task,
length), plus per length the mean over tasks (``ruler_avg``), over the single-needle tasks
(``niah_single_avg``, Table 13) and over the QA tasks (``qa_avg``, Tables 3, 4, 10).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm_megatron.eval.loading import EvalError
from mm_megatron.eval.prefill import DEFAULT_CHUNK, greedy_decode, prefill
from mm_megatron.eval.progress import SampleProgress
from mm_megatron.eval.ruler import TASKS, PromptTooLong, make_sample
from mm_megatron.eval.ruler_qa import QAData, read_qa_file
from mm_megatron.eval.ruler_text import open_haystack
from mm_megatron.eval.scoring import METRIC_NAMES, mean_percent, score
from mm_megatron.eval.suites import parse_int_list, parse_name_list

DESCRIPTION = "RULER-style long context: NIAH, variable tracking, CWE/FWE, multi-document QA"
DEFAULT_LENGTHS = "4k,8k,16k,32k,64k"
SYNTHETIC = [t for t, spec in TASKS.items() if spec.family != "qa"]


def add_args(p: argparse.ArgumentParser) -> None:
    """The suite's options."""
    p.add_argument(
        "--tasks",
        default="all",
        help=f"comma list from {', '.join(TASKS)}; 'all' = the synthetic tasks plus "
        "the QA task of each --qa-file; 'niah' = the NIAH tasks",
    )
    p.add_argument(
        "--lengths",
        default=DEFAULT_LENGTHS,
        help="context lengths in tokens (prompt + generation), e.g. 4k,8k,16384",
    )
    p.add_argument("--samples", type=int, default=50, help="samples per task and length")
    p.add_argument(
        "--haystack-corpus",
        help="the 'essay' haystack: a .jsonl file or an indexed dataset prefix "
        "(default: the noise haystack everywhere)",
    )
    p.add_argument("--haystack-field", default="text", help="text field of the jsonl corpus")
    p.add_argument(
        "--qa-file",
        action="append",
        default=[],
        help="SQuAD or HotpotQA file (json / jsonl); repeatable",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK,
        help="prefill chunk in tokens (memory vs speed)",
    )
    p.add_argument("--max-new-tokens", type=int, help="override every task's generation length")
    p.add_argument(
        "--save-predictions",
        action="store_true",
        help="store every prompt's answers and prediction in the result file",
    )


def validate(args: argparse.Namespace) -> None:
    """Check the options (and read the QA files) before the model loads."""
    args.length_list = parse_int_list(args.lengths, "--lengths", minimum=64)
    if args.samples < 1:
        raise EvalError(f"--samples: must be >= 1, got {args.samples}")
    if args.chunk_size < 1:
        raise EvalError(f"--chunk-size: must be >= 1, got {args.chunk_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.haystack_corpus is not None:
        from mm_megatron.data.indexed import dataset_exists

        path = Path(args.haystack_corpus)
        if not path.is_file() and not dataset_exists(args.haystack_corpus):
            raise EvalError(
                f"--haystack-corpus {path}: neither a jsonl file nor an indexed "
                "dataset prefix (PREFIX.bin and PREFIX.idx)"
            )
    args.qa_data = {}
    for f in args.qa_file:
        try:
            qa = read_qa_file(f)
        except ValueError as err:
            raise EvalError(f"--qa-file: {err}") from None
        if qa.task in args.qa_data:
            raise EvalError(f"--qa-file {f}: a second {qa.kind} file")
        args.qa_data[qa.task] = qa
    if args.tasks == "all":
        args.task_list = SYNTHETIC + list(args.qa_data)
    elif args.tasks == "niah":
        args.task_list = [t for t in TASKS if TASKS[t].family == "niah"]
    else:
        args.task_list = parse_name_list(args.tasks, "--tasks", list(TASKS))
    for task in args.task_list:
        if TASKS[task].family == "qa" and task not in args.qa_data:
            raise EvalError(
                f"--tasks {task}: needs a --qa-file in {TASKS[task].params['kind']} format"
            )


def token_counter(tokenizer: Any, bos: int | None) -> Callable[[str], int]:
    """Number of tokens the model reads for a prompt (BOS included)."""
    extra = 1 if bos is not None else 0
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False)) + extra


def prompt_ids(tokenizer: Any, text: str, bos: int | None) -> list[int]:
    """Token ids of a prompt: BOS, then the text (one document)."""
    return ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False)


def _summary_rows(rows: list[dict[str, Any]], lengths: list[int]) -> list[dict[str, Any]]:
    out = []
    groups = {
        "ruler_avg": lambda t: True,
        "niah_single_avg": lambda t: t.startswith("niah_single"),
        "qa_avg": lambda t: TASKS[t].family == "qa",
    }
    for name, member in groups.items():
        for length in lengths:
            scores = [
                r["score"] for r in rows if r["x"] == length and member(r["task"]) and r["n"] > 0
            ]
            tasks = {r["task"] for r in rows if member(r["task"])}
            if name != "ruler_avg" and len(tasks) < 2:
                continue
            if scores:
                out.append(
                    {
                        "task": name,
                        "metric": "mean score",
                        "score": sum(scores) / len(scores),
                        "n": len(scores),
                        "x_name": "context length",
                        "x": length,
                    }
                )
    return out


def run(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every (task, length) and return the rows and details."""
    loaded = args.loaded
    bos, eos = loaded.bos_id, loaded.eos_id
    count = token_counter(tokenizer, bos)
    try:
        haystack = open_haystack(
            args.haystack_corpus, args.haystack_field, decode=lambda ids: tokenizer.decode(ids)
        )
    except ValueError as err:
        raise EvalError(f"--haystack-corpus: {err}") from None
    qa_data: dict[str, QAData] = args.qa_data
    lengths: list[int] = args.length_list
    total = len(args.task_list) * len(lengths) * args.samples
    bar = SampleProgress(total, "ruler", enabled=not args.quiet)
    rows: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    stop = [eos] if eos is not None else []
    for task in args.task_list:
        spec = TASKS[task]
        for length in lengths:
            scores, tokens, start = [], [], time.perf_counter()
            for index in range(args.samples):
                bar.note = f"{task} @ {length}"
                try:
                    sample = make_sample(
                        task,
                        length,
                        index,
                        args.seed,
                        count,
                        haystack,
                        qa_data.get(task),
                        args.max_new_tokens,
                    )
                except PromptTooLong as err:
                    skipped[f"{task}@{length}"] = str(err)
                    bar.update(args.samples - index)
                    break
                except ValueError as err:  # corpus errors (file and line named)
                    raise EvalError(f"{task}: {err}") from None
                ids = prompt_ids(tokenizer, sample.prompt, bos)
                state = prefill(model, ids, args.chunk_size)
                new = greedy_decode(model, state, sample.max_new_tokens, stop)
                del state
                text = tokenizer.decode(new, skip_special_tokens=True)
                s = score(sample.metric, text, sample.answers)
                scores.append(s)
                tokens.append(len(ids))
                if args.save_predictions:
                    predictions.append(
                        {
                            "task": task,
                            "length": length,
                            "index": index,
                            "prompt_tokens": len(ids),
                            "answers": sample.answers,
                            "prediction": text,
                            "score": s,
                            "meta": sample.meta,
                        }
                    )
                bar.update()
            rows.append(
                {
                    "task": task,
                    "metric": METRIC_NAMES[spec.metric],
                    "score": mean_percent(scores) if scores else None,
                    "n": len(scores),
                    "x_name": "context length",
                    "x": length,
                    "mean_prompt_tokens": sum(tokens) / len(tokens) if tokens else None,
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )
    bar.close()
    details: dict[str, Any] = {
        "tasks": {
            t: {"ruler_name": TASKS[t].ruler_name, "description": TASKS[t].description}
            for t in args.task_list
        },
        "haystack": args.haystack_corpus or "noise",
        "skipped": skipped,
        "qa_files": {k: v.path for k, v in qa_data.items()},
    }
    if args.save_predictions:
        details["predictions"] = predictions
    return {"rows": rows + _summary_rows(rows, lengths), "details": details}
