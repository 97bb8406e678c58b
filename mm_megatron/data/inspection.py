"""What an indexed dataset holds: counts, a length histogram, and decoded documents."""

from __future__ import annotations

import json
import os

import numpy as np

from .indexed import DatasetIndex, meta_path, read_index
from .tokenizers import Tokenizer, load_tokenizer


def dataset_stats(index: DatasetIndex) -> dict:
    """Counts and length statistics (tokens per document) of a dataset."""
    lengths = index.document_lengths()
    stats = {
        "prefix": index.prefix,
        "dtype": index.dtype.name,
        "documents": index.num_documents,
        "sequences": int(len(index.sequence_lengths)),
        "tokens": index.num_tokens,
        "bin_bytes": index.bin_size,
    }
    if len(lengths):
        q = np.percentile(lengths, [50, 90, 99])
        stats.update(
            min=int(lengths.min()),
            mean=float(lengths.mean()),
            median=float(q[0]),
            p90=float(q[1]),
            p99=float(q[2]),
            max=int(lengths.max()),
        )
    return stats


def length_histogram(index: DatasetIndex) -> list[tuple[int, int, int, int]]:
    """Power-of-two buckets of document length: ``(low, high, documents, tokens)``."""
    lengths = index.document_lengths()
    if not len(lengths):
        return []
    buckets = np.zeros(len(lengths), dtype=np.int64)
    positive = lengths > 0
    buckets[positive] = np.floor(np.log2(lengths[positive])).astype(np.int64) + 1
    out = []
    for b in range(int(buckets.max()) + 1):
        sel = buckets == b
        if sel.any():
            low, high = (0, 0) if b == 0 else (2 ** (b - 1), 2**b - 1)
            out.append((low, high, int(sel.sum()), int(lengths[sel].sum())))
    return out


def format_histogram(hist: list[tuple[int, int, int, int]], width: int = 40) -> str:
    """A text bar chart of ``length_histogram``."""
    if not hist:
        return "(no documents)"
    peak = max(h[2] for h in hist)
    rows = [f"{'tokens/doc':>19} {'docs':>10} {'tokens':>13}"]
    for low, high, docs, tokens in hist:
        bar = "#" * max(1, round(width * docs / peak))
        rows.append(f"{low:>9,}-{high:<9,} {docs:>10,} {tokens:>13,}  {bar}")
    return "\n".join(rows)


def read_meta(prefix: str | os.PathLike) -> dict | None:
    """The sidecar ``PREFIX.meta.json`` written by preprocessing as a dict, or None when there
    is none (e.g. a dataset written by another tool). A sidecar that is not a JSON object is a
    ValueError naming the file."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable dataset metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: dataset metadata is not a JSON object")
    return meta


def tokenizer_for(prefix: str | os.PathLike, spec: str | None = None) -> Tokenizer:
    """The tokenizer named by ``spec``, else the one recorded in the dataset's sidecar."""
    if spec is None:
        meta = read_meta(prefix)
        if not meta or "tokenizer" not in meta:
            raise ValueError(
                f"{prefix}: no {meta_path(prefix)} naming the tokenizer; pass --tokenizer"
            )
        spec = meta["tokenizer"]
    return load_tokenizer(spec)


def decode_document(index: DatasetIndex, i: int, tokenizer: Tokenizer) -> str:
    """The text of document ``i`` (special tokens rendered as their strings)."""
    if not -index.num_documents <= i < index.num_documents:
        raise IndexError(f"document {i} out of range (dataset has {index.num_documents})")
    return tokenizer.decode(index.document(i % index.num_documents).tolist())


__all__ = [
    "dataset_stats",
    "decode_document",
    "format_histogram",
    "length_histogram",
    "read_index",
    "read_meta",
    "tokenizer_for",
]
