"""Evaluate MM v2 (or the transformer baseline) the way the paper does: one subcommand per suite.

    python tools/evaluate.py ruler   --model exports/mm --out results/mm_ruler.json \\
        [--lengths 4k,8k,16k,32k,64k] [--tasks all] [--samples 50] [--qa-file squad.json]
    python tools/evaluate.py icl     --model exports/mm --data banking77.jsonl \\
        --out results/mm_icl.json [--shots 1,5,10,25] [--labels real,anonymous]
    python tools/evaluate.py lm-eval --model exports/mm --tasks arc_easy,piqa \\
        --out results/mm_lm_eval.json [--include-path my_tasks/] [--num-fewshot 0]
    python tools/evaluate.py compare results/mm_ruler.json results/llama_ruler.json \\
        [--plots plots/]                        (also: tools/evaluate.py --compare FILES ...)
    python tools/evaluate.py make-icl-data --out synthetic.jsonl [--classes 8 --per-class 40]
    python tools/evaluate.py position-loss --model exports/mm --data VALID_PREFIX --length 1024
    python tools/evaluate.py ltm-sweep --model exports/mm --offsets 16,32,64 --with-no-ltm ...
    python tools/evaluate.py mqar --model exports/mm --lengths 256,512,1024,2048

Every suite takes ``--model DIR`` (a Hugging Face export) or ``--megatron-checkpoint DIR``
(converted in memory), ``--device``, ``--dtype``, ``--no-ltm``, ``--label``, ``--seed``,
``--out`` and ``--quiet``. It writes one JSON result file and prints its table on stdout;
progress goes to stderr. Suites are registered in ``mm_megatron/eval/suites.py``. The
extrapolation commands (position-loss, ltm-sweep, mqar: ``mm_megatron/eval/
extrapolation_cli.py``) take ``--model`` (an HF directory or a Megatron checkpoint), ``--no-ltm``
and ``--output``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from mm_megatron.eval.loading import EvalError, add_model_args, load_model
from mm_megatron.eval.results import format_rows, make_document, write_json
from mm_megatron.eval.suites import SUITES, load_suite


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def build_parser() -> argparse.ArgumentParser:
    """The parser with one subcommand per available suite, plus compare and make-icl-data."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUITES:
        module = load_suite(name)
        if module is None:
            sub.add_parser(name, help="(not available: its module is not installed)")
            continue
        sp = sub.add_parser(
            name,
            help=module.DESCRIPTION,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_model_args(sp)
        sp.add_argument("--out", help="result JSON (default: eval_results/<suite>-<label>.json)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        module.add_args(sp)
        sp.set_defaults(suite=name)
    from mm_megatron.eval import compare, extrapolation_cli

    extrapolation_cli.add_subcommands(sub)  # position-loss, ltm-sweep, mqar
    cp = sub.add_parser(
        "compare",
        help="result files side by side, and plots",
        description=compare.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_args(cp)
    from mm_megatron.eval import icl_data

    dp = sub.add_parser(
        "make-icl-data",
        help="write a synthetic classification jsonl",
        description=icl_data.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    icl_data.add_args(dp)
    return p


def run_suite(args: argparse.Namespace) -> int:
    """Load the model, run the suite, write the result file and print the table."""
    module = load_suite(args.suite)
    if module is None:
        raise EvalError(f"{args.suite}: not available ({SUITES[args.suite]} is not installed)")
    if hasattr(module, "validate"):
        module.validate(args)
    if args.out is not None and Path(args.out).is_dir():
        raise EvalError(f"--out {args.out}: is a directory (give a file name)")
    start = time.perf_counter()
    loaded = load_model(args)
    try:
        args.loaded = loaded
        result = module.run(loaded.model, loaded.tokenizer, args)
    finally:
        loaded.close()
    del args.loaded
    rows = result.get("rows", []) if isinstance(result, dict) else []
    details = result.get("details", {}) if "rows" in result else result
    doc = make_document(
        args.suite, loaded.describe(), args, rows, details, round(time.perf_counter() - start, 3)
    )
    out = Path(args.out or f"eval_results/{args.suite}-{_slug(loaded.label)}.json")
    write_json(out, doc)
    print(format_rows(doc))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--compare":
        argv[0] = "compare"
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            from mm_megatron.eval import compare

            return compare.main(args)
        if args.command == "make-icl-data":
            from mm_megatron.eval import icl_data

            return icl_data.main(args)
        if getattr(args, "extrapolation", False):
            from mm_megatron.eval import extrapolation_cli

            return extrapolation_cli.run_command(args)
        return run_suite(args)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
