"""Write the demo corpus: the Python standard library's own sources as jsonl.

    python tools/gather_demo_corpus.py --output data/demo/stdlib.jsonl

One document per module ({"id", "module", "text"}), in sorted path order; nothing is
downloaded. Test suites are left out unless --include-tests is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_megatron.data.demo_corpus import gather_demo_corpus, stdlib_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="jsonl file to write")
    p.add_argument("--max-docs", type=int, help="stop after this many documents")
    p.add_argument("--max-bytes", type=int, help="stop once this many bytes of text are written")
    p.add_argument(
        "--include-tests",
        action="store_true",
        help="also take the standard library's test suites (about 2.5x more text)",
    )
    p.add_argument("--stdlib", type=Path, help=f"source directory (default {stdlib_dir()})")
    args = p.parse_args(argv)
    counts = gather_demo_corpus(
        args.output, args.max_docs, args.max_bytes, args.include_tests, args.stdlib
    )
    print(
        f"wrote {args.output}: {counts['documents']} documents, "
        f"{counts['bytes'] / 1e6:.1f} MB "
        f"({counts['left_out']} empty or non-UTF-8 files left out)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
