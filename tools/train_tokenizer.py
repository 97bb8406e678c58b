"""Train a byte-level BPE tokenizer (Llama-3 style pre-tokenization) on a corpus.

    python tools/train_tokenizer.py --input data/demo/stdlib.jsonl --vocab-size 4096 \\
        --output-dir data/demo/tokenizer

Writes OUTPUT_DIR/tokenizer.json (+ tokenizer_config.json); the BPE ids come first, then the
special tokens (<|begin_of_text|>, <|end_of_text|> by default; --llama3-specials adds
Llama 3's full set of 256). --tiktoken also writes OUTPUT_DIR/tokenizer.model in the Llama-3
tiktoken format (needs --llama3-specials so that both files agree on the special ids).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mm_megatron.data.bpe_trainer import (
    export_tiktoken,
    iter_texts,
    save_tokenizer,
    train_bpe,
)
from mm_megatron.data.readers import TEXT_UNITS
from mm_megatron.data.tokenizers import (
    BOS_TOKEN,
    EOS_TOKEN,
    llama3_special_tokens,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="corpus files, directories or globs (same formats as preprocessing)",
    )
    p.add_argument("--output-dir", required=True, help="directory for tokenizer.json")
    p.add_argument(
        "--vocab-size", type=int, default=32768, help="total vocabulary, special tokens included"
    )
    p.add_argument("--json-key", default="text", help="JSON key / parquet column of the text")
    p.add_argument(
        "--text-unit",
        default="file",
        choices=TEXT_UNITS,
        help="for plain-text files: one document per file, line or paragraph",
    )
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")
    p.add_argument("--max-bytes", type=int, help="train on at most this much text")
    p.add_argument(
        "--special-tokens",
        nargs="*",
        default=None,
        help=f"special tokens (default: {BOS_TOKEN} {EOS_TOKEN})",
    )
    p.add_argument(
        "--llama3-specials", action="store_true", help="use Llama 3's 256 special tokens"
    )
    p.add_argument(
        "--tiktoken",
        action="store_true",
        help="also write tokenizer.model in the Llama-3 tiktoken format",
    )
    args = p.parse_args(argv)
    specials = llama3_special_tokens() if args.llama3_specials else args.special_tokens
    if args.tiktoken and not args.llama3_specials:
        p.error("--tiktoken needs --llama3-specials (the tiktoken loader adds Llama 3's set)")
    start = time.perf_counter()
    texts = iter_texts(args.input, args.json_key, args.text_unit, args.max_bytes)
    tok = train_bpe(
        texts, args.vocab_size, specials, args.min_frequency, show_progress=sys.stderr.isatty()
    )
    path = save_tokenizer(tok, args.output_dir)
    print(
        f"wrote {path}: vocabulary {tok.get_vocab_size(with_added_tokens=True)} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if args.tiktoken:
        out = export_tiktoken(tok, Path(args.output_dir) / "tokenizer.model")
        print(f"wrote {out} (tiktoken, Llama-3 format)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
