"""Show what an indexed dataset holds: counts, a length histogram, decoded documents.

    python tools/inspect_dataset.py data/demo/demo_text_document
    python tools/inspect_dataset.py data/demo/demo_text_document --show 0 5 -1 --max-chars 400
    python tools/inspect_dataset.py --blend "0.7 data/a_text_document 0.3 data/b_text_document"
    python tools/inspect_dataset.py --blend-file pretrain/configs/x.yaml --blend-key data.blend

Decoding uses --tokenizer, else the tokenizer recorded in PREFIX.meta.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mm_megatron.data.blends import BlendError, validate_blend
from mm_megatron.data.inspection import (
    dataset_stats,
    decode_document,
    format_histogram,
    length_histogram,
    read_index,
    tokenizer_for,
)


def _check_blend(args: argparse.Namespace) -> int:
    blend = args.blend
    if args.blend_file:
        import yaml

        node = yaml.safe_load(Path(args.blend_file).read_text())
        for key in args.blend_key.split(".") if args.blend_key else []:
            if not isinstance(node, dict) or key not in node:
                print(f"error: {args.blend_file}: no key {args.blend_key!r}", file=sys.stderr)
                return 1
            node = node[key]
        blend = node
    try:
        result = validate_blend(blend)
    except BlendError as exc:
        print(f"error: invalid blend:\n{exc}", file=sys.stderr)
        return 1
    splits = result if isinstance(result, dict) else {"all splits": result}
    for split, entries in splits.items():
        print(f"{split}:")
        for e in entries:
            print(f"  p={e.weight:.4f}  {e.prefix}  ({e.documents:,} docs, {e.tokens:,} tokens)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("prefix", nargs="?", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument(
        "--show",
        type=int,
        nargs="*",
        default=[],
        help="decode these documents (negative counts from the end)",
    )
    p.add_argument("--tokens", action="store_true", help="also print the token ids shown")
    p.add_argument("--max-chars", type=int, default=2000, help="cut decoded text (0: no limit)")
    p.add_argument("--tokenizer", help="tokenizer spec (default: from PREFIX.meta.json)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.add_argument("--blend", nargs="+", help="validate a blend: 'w prefix w prefix ...'")
    p.add_argument("--blend-file", help="validate the blend in this YAML file")
    p.add_argument(
        "--blend-key",
        default="",
        help="dotted key of the blend inside --blend-file (a list, or a mapping "
        "with train/valid/test lists)",
    )
    args = p.parse_args(argv)
    if args.blend or args.blend_file:
        return _check_blend(args)
    if not args.prefix:
        p.error("give a dataset prefix, --blend or --blend-file")
    try:
        index = read_index(args.prefix)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats = dataset_stats(index)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for key, value in stats.items():
            text = (
                f"{value:,.1f}"
                if isinstance(value, float)
                else (f"{value:,}" if isinstance(value, int) else value)
            )
            print(f"{key:>10}  {text}")
        print()
        print(format_histogram(length_histogram(index)))
    if args.show:
        tok = tokenizer_for(args.prefix, args.tokenizer)
        for i in args.show:
            try:
                text = decode_document(index, i, tok)
            except IndexError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            n = index.num_documents
            print(f"\n===== document {i % n} of {n} ({len(index.document(i % n))} tokens) =====")
            if args.tokens:
                ids = index.document(i % n).tolist()
                print(ids[:256], f"... [{len(ids) - 256} more]" if len(ids) > 256 else "")
            print(
                text
                if not args.max_chars or len(text) <= args.max_chars
                else text[: args.max_chars] + f"... [{len(text) - args.max_chars} more chars]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
