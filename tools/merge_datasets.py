"""Merge indexed datasets (e.g. the per-rank parts of a multi-node run) into one.

    python tools/merge_datasets.py --parts-of data/web_text_document
    python tools/merge_datasets.py --inputs data/a data/b --output-prefix data/ab

--parts-of PREFIX takes PREFIX.part-00000-of-NNNNN ... in rank order, checks that all N are
there, and writes PREFIX.{bin,idx}, byte-identical to a single-node run over the same
inputs. The output is written under temporary names and renamed at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

from mm_megatron.data.merging import find_parts, merge


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--parts-of", metavar="PREFIX", help="merge PREFIX.part-*-of-N")
    src.add_argument("--inputs", nargs="+", metavar="PREFIX", help="dataset prefixes, in order")
    p.add_argument("--output-prefix", help="output prefix (default: PREFIX of --parts-of)")
    p.add_argument(
        "--delete-inputs",
        action="store_true",
        help="remove the input datasets after a successful merge",
    )
    args = p.parse_args(argv)
    output = args.output_prefix or args.parts_of
    if output is None:
        p.error("--output-prefix is required with --inputs")
    start = time.perf_counter()
    try:
        prefixes = find_parts(args.parts_of) if args.parts_of else args.inputs
        index = merge(prefixes, output, args.delete_inputs)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} dataset(s) into {output}.{{bin,idx}}: "
        f"{index.num_documents:,} documents, {index.num_tokens:,} tokens "
        f"({index.dtype.name}) in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
