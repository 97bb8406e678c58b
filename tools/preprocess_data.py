"""Tokenize a corpus into a Megatron indexed dataset (PREFIX.bin / PREFIX.idx).

Single node:
    python tools/preprocess_data.py --input data/raw/ --output-prefix data/web_text_document \\
        --tokenizer path/to/tokenizer.json --workers 16

Multi-node (one task per node; the rank comes from SLURM_PROCID/SLURM_NTASKS or --rank and
--world-size; each rank writes PREFIX.part-RRRRR-of-NNNNN):
    srun python tools/preprocess_data.py --input 'data/raw/*.jsonl.zst' --output-prefix P ...
    python tools/merge_datasets.py --parts-of P
"""

from __future__ import annotations

import argparse
import sys

from mm_megatron.data.preprocess import (
    PreprocessConfig,
    PreprocessError,
    default_workers,
    preprocess,
)
from mm_megatron.data.readers import TEXT_UNITS
from mm_megatron.data.tokenizers import TokenizerError


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, directories (searched recursively) or globs: .jsonl, "
        ".jsonl.gz, .jsonl.zst, .parquet, .txt (also .txt.gz/.zst)",
    )
    io.add_argument(
        "--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json"
    )
    io.add_argument(
        "--json-key",
        default="text",
        help="JSON key (jsonl) or column name (parquet) holding the text",
    )
    io.add_argument(
        "--input-format",
        default="auto",
        choices=["auto", "jsonl", "parquet", "text"],
        help="override the format detected from file names",
    )
    io.add_argument(
        "--text-unit",
        default="file",
        choices=TEXT_UNITS,
        help="for plain-text files: one document per file, line or paragraph",
    )
    tk = p.add_argument_group("tokenizer and document framing")
    tk.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer.json, tiktoken .model/.tiktoken, SentencePiece .model, a "
        "directory holding one, or hf:/tiktoken:/sentencepiece:PATH",
    )
    tk.add_argument(
        "--append-bos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="put the begin-of-text token before each document",
    )
    tk.add_argument(
        "--append-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="put the end-of-text (EOD) token after each document",
    )
    tk.add_argument("--bos-token", help="begin-of-text token string, if not the default")
    tk.add_argument("--eos-token", help="end-of-text token string, if not the default")
    rn = p.add_argument_group("execution")
    rn.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="tokenizer processes (0: tokenize in the main process); default: "
        "the number of usable cores",
    )
    rn.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "skip"],
        help="stop at the first bad record, or skip bad records and count them",
    )
    rn.add_argument("--error-log", help="append every skipped record (file:line: reason) here")
    rn.add_argument("--rank", type=int, help="this task's rank (default: $SLURM_PROCID or 0)")
    rn.add_argument("--world-size", type=int, help="number of tasks (default: $SLURM_NTASKS or 1)")
    rn.add_argument(
        "--chunk-bytes",
        type=int,
        default=1 << 20,
        help="bytes of text per work item sent to a worker",
    )
    rn.add_argument(
        "--max-in-flight",
        type=int,
        help="work items outstanding at once (default 2*workers+2); bounds memory",
    )
    rn.add_argument(
        "--start-method",
        choices=["spawn", "forkserver", "fork"],
        help="how worker processes are started (default spawn)",
    )
    rn.add_argument(
        "--resume",
        action="store_true",
        help="keep this task's output when it is already complete (same inputs, "
        "tokenizer and framing): a resubmitted multi-node job redoes only the "
        "parts that are missing or incomplete",
    )
    rn.add_argument("--no-progress", action="store_true", help="no progress line")
    rn.add_argument(
        "--log-interval",
        type=float,
        help="seconds between progress lines (default 0.5 on a terminal, else 30)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    cfg = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        json_key=args.json_key,
        input_format=args.input_format,
        text_unit=args.text_unit,
        workers=args.workers,
        append_bos=args.append_bos,
        append_eos=args.append_eos,
        bos_token=args.bos_token,
        eos_token=args.eos_token,
        on_error=args.on_error,
        rank=args.rank,
        world_size=args.world_size,
        chunk_bytes=args.chunk_bytes,
        max_in_flight=args.max_in_flight,
        progress=not args.no_progress,
        log_interval=args.log_interval,
        error_log=args.error_log,
        start_method=args.start_method,
        resume=args.resume,
    )
    try:
        summary = preprocess(cfg)
    except (PreprocessError, TokenizerError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; no output was written", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
