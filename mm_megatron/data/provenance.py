"""Where a dataset's tokens come from, and whether a run may train on them.

Each dataset written by ``tools/preprocess_data.py`` has a sidecar ``PREFIX.meta.json`` naming
its tokenizer (kind and files, a SHA-256 fingerprint of their contents), the BOS/EOS ids it
framed documents with, the vocabulary size and the token dtype. A training run compares them
with its own tokenizer before any work: MM v2 resets its memories at the end-of-document id,
so a dataset tokenized with another EOS would silently let memories run across documents.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .indexed import meta_path, optimal_dtype
from .inspection import read_meta
from .tokenizers import Tokenizer


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """SHA-256 over the tokenizer's files (names and contents, in order): equal fingerprints
    mean the same tokenizer wherever the files lie."""
    digest = hashlib.sha256()
    for path in tok.files():
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class ProvenanceReport:
    """Outcome of comparing one dataset's metadata with the training tokenizer."""

    prefix: str
    errors: list[str]  # mismatches that would corrupt training
    notes: list[str]  # what could not be checked


def check_provenance(
    prefix: str | os.PathLike,
    tok: Tokenizer,
    fingerprint: str | None = None,
) -> ProvenanceReport:
    """Compare ``PREFIX.meta.json`` with the training tokenizer ``tok``.

    Errors: another tokenizer (fingerprint), an end-of-document id other than the tokenizer's
    EOS, a vocabulary larger than the tokenizer's, a token dtype too narrow for the
    vocabulary. Notes: no metadata, or metadata from before fingerprints were recorded (then
    the ids and vocabulary are still compared).
    """
    prefix = os.fspath(prefix)
    report = ProvenanceReport(prefix, [], [])
    meta = read_meta(prefix)
    where = meta_path(prefix)
    if meta is None:
        report.notes.append(f"{where} is missing: the dataset's tokenizer cannot be checked")
        return report
    fingerprint = fingerprint or tokenizer_fingerprint(tok)
    stored = meta.get("tokenizer_sha256")
    if stored is None:
        report.notes.append(
            f"{where} records no tokenizer fingerprint (written by an older "
            "version): only the ids and vocabulary size are compared"
        )
    elif stored != fingerprint:
        report.errors.append(
            f"{where}: tokenized with {meta.get('tokenizer')} (sha256 "
            f"{stored[:12]}), not the training tokenizer {tok.name} (sha256 "
            f"{fingerprint[:12]})"
        )
    eos = meta.get("eos_id")
    if eos is None:
        report.errors.append(
            f"{where}: documents were written without an end-of-document "
            "token (--no-append-eos); MM v2 needs one to reset its memories "
            "between documents"
        )
    elif eos != tok.eos_id:
        report.errors.append(
            f"{where}: end-of-document id {eos}, but the training tokenizer's "
            f"end-of-text id is {tok.eos_id}: memories would run across "
            "documents"
        )
    vocab = meta.get("vocab_size")
    if isinstance(vocab, int) and vocab > tok.vocab_size:
        report.errors.append(
            f"{where}: vocabulary of {vocab} ids, larger than the training "
            f"tokenizer's {tok.vocab_size}"
        )
    dtype = meta.get("dtype")
    if isinstance(dtype, str) and dtype != optimal_dtype(tok.vocab_size).name:
        wide = {"uint16": 1 << 16, "int32": 1 << 31}.get(dtype, 0)
        if wide < tok.vocab_size:
            report.errors.append(
                f"{where}: token dtype {dtype} cannot hold the training "
                f"vocabulary of {tok.vocab_size}"
            )
    return report
