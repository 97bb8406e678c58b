"""Megatron indexed datasets (``.bin``/``.idx``): a streaming writer, a reader, and merging.

The layout is the one ``megatron.core.datasets.indexed_dataset.IndexedDataset`` reads:
the ``.idx`` file holds ``b"MMIDIDX\\x00\\x00"``, u64 version 1, u8 dtype code, u64 sequence
count, u64 document-index count, int32 sequence lengths, int64 byte pointers and int64
document indices; the ``.bin`` file holds the concatenated tokens. Each document written
here is one sequence.

Files are written under temporary names and renamed at the end (``.bin`` first, ``.idx``
last, after removing any older ``.idx``), so an interrupted run never leaves a pair that
looks complete. This module does not import torch or megatron.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_BLOCK = 1 << 20


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Token dtype for a vocabulary, as Megatron's ``DType.optimal_dtype``."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> str:
    """The ``.bin`` path of a dataset prefix."""
    return os.fspath(prefix) + ".bin"


def idx_path(prefix: str | os.PathLike) -> str:
    """The ``.idx`` path of a dataset prefix."""
    return os.fspath(prefix) + ".idx"


def meta_path(prefix: str | os.PathLike) -> str:
    """The sidecar JSON (tokenizer, counts, inputs) of a dataset prefix."""
    return os.fspath(prefix) + ".meta.json"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    """Whether both ``.bin`` and ``.idx`` exist at ``prefix``."""
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


@dataclass
class DatasetIndex:
    """The contents of an ``.idx`` file (arrays are read-only memory maps)."""

    prefix: str
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32[sequences]
    sequence_pointers: np.ndarray  # int64[sequences]
    document_indices: np.ndarray  # int64[documents + 1]
    bin_size: int

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Number of tokens in the ``.bin`` file."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (documents may span several sequences)."""
        if len(self.sequence_lengths) == self.num_documents:
            return self.sequence_lengths.astype(np.int64)
        ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return np.diff(ends[self.document_indices])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i``."""
        first, last = int(self.document_indices[i]), int(self.document_indices[i + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first])
        count = int(self.sequence_lengths[first:last].sum(dtype=np.int64))
        return np.fromfile(bin_path(self.prefix), dtype=self.dtype, count=count, offset=start)


def read_index(prefix: str | os.PathLike, check_bin: bool = True) -> DatasetIndex:
    """Read and validate the ``.idx`` of ``prefix`` (and the size of its ``.bin``)."""
    prefix = os.fspath(prefix)
    path = idx_path(prefix)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such index (is {prefix!r} a dataset prefix?)")
    with open(path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise ValueError(f"{path}: not a Megatron indexed dataset index (bad header)")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if version != 1 or code not in _CODE_DTYPES:
        raise ValueError(f"{path}: unsupported version {version} or dtype code {code}")
    expected = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
    actual = os.path.getsize(path)
    if actual < expected:
        raise ValueError(f"{path}: truncated index ({actual} bytes, expected {expected})")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = mm[34 : 34 + n_seq * 4].view(np.int32)
    pointers = mm[34 + n_seq * 4 : 34 + n_seq * 12].view(np.int64)
    documents = mm[34 + n_seq * 12 : 34 + n_seq * 12 + n_doc * 8].view(np.int64)
    dtype = _CODE_DTYPES[code]
    size = os.path.getsize(bin_path(prefix)) if os.path.isfile(bin_path(prefix)) else -1
    if check_bin:
        want = int(lengths.sum(dtype=np.int64)) * dtype.itemsize
        if size != want:
            raise ValueError(f"{bin_path(prefix)}: {size} bytes, but the index describes {want}")
    return DatasetIndex(prefix, dtype, lengths, pointers, documents, size)


def _tmp(path: str) -> str:
    """A temporary name that says which process on which host writes it."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(prefix: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Temporary files of earlier writers of ``prefix`` (``.bin``/``.idx``/``.meta.json``).

    Returns ``(stale, foreign)``: ``stale`` were written on this host by processes that no
    longer run (a killed run); ``foreign`` were written on another host (shared file system)
    or by a process that still runs, so they are left alone. Names without a host are from
    earlier versions, which wrote ``.tmp-PID`` on the local host.
    """
    prefix = os.fspath(prefix)
    host = socket.gethostname()
    stale, foreign = [], []
    for final in (bin_path(prefix), idx_path(prefix), meta_path(prefix)):
        for path in sorted(glob.glob(glob.escape(final) + ".tmp-*")):
            tag = path[len(final) + len(".tmp-") :]
            where, _, pid = tag.rpartition("-")
            if not pid.isdigit():
                foreign.append(path)
            elif where in ("", host) and not pid_alive(int(pid)):
                stale.append(path)
            else:
                foreign.append(path)
    return stale, foreign


def remove_stale_temporaries(prefix: str | os.PathLike, log: TextIO | None = None) -> list[str]:
    """Remove the temporary files a killed writer of ``prefix`` left on this host; report
    (and keep) those of other hosts or of live processes. Returns the removed paths."""
    stale, foreign = stale_temporaries(prefix)
    for path in stale:
        size = os.path.getsize(path)
        os.unlink(path)
        if log is not None:
            log.write(f"removed {path} ({size:,} bytes) left by a run that no longer runs\n")
    for path in foreign:
        if log is not None:
            log.write(f"note: {path} belongs to a live process or another host; left alone\n")
    return stale


class IndexedWriter:
    """Stream documents into ``prefix.bin``/``prefix.idx`` (temporary names until ``finalize``).

    Use as a context manager: leaving the block by an exception removes the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = _tmp(bin_path(self.prefix))
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115
        self._lengths = array("i")
        self._doc_indices: array | None = None  # only when a document spans several sequences
        self.num_tokens = 0
        self._max_id = np.iinfo(self.dtype).max

    @property
    def num_documents(self) -> int:
        """Documents written so far."""
        if self._doc_indices is None:
            return len(self._lengths)
        return len(self._doc_indices) - 1

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated tokens and their lengths."""
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            if tokens.size and (tokens.min() < 0 or tokens.max() > self._max_id):
                raise ValueError(f"token ids out of range for {self.dtype}")
            tokens = tokens.astype(self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise ValueError("lengths do not add up to the number of tokens")
        self._bin.write(tokens.tobytes(order="C"))
        start = len(self._lengths)
        self._lengths.frombytes(lengths.tobytes())
        if self._doc_indices is not None:
            self._doc_indices.extend(range(start + 1, start + 1 + len(lengths)))
        self.num_tokens += tokens.size

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document."""
        arr = np.asarray(tokens)
        self.add_documents(arr, np.array([arr.size], dtype=np.int32))

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append a whole existing dataset (same dtype)."""
        index = read_index(prefix)
        if index.dtype != self.dtype:
            raise ValueError(f"{prefix}: dtype {index.dtype} differs from {self.dtype}")
        start = len(self._lengths)
        simple = len(index.sequence_lengths) == index.num_documents
        if not simple and self._doc_indices is None:
            self._doc_indices = array("q", range(start + 1))
        self._lengths.frombytes(np.ascontiguousarray(index.sequence_lengths).tobytes())
        if self._doc_indices is not None:
            docs = np.asarray(index.document_indices[1:], dtype=np.int64) + start
            self._doc_indices.frombytes(docs.tobytes())
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)
        self.num_tokens += index.num_tokens

    def finalize(self, meta: dict | None = None) -> None:
        """Write the index and move ``.bin``, the metadata sidecar and ``.idx`` into place."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        idx_tmp = _tmp(idx_path(self.prefix))
        self._write_index(idx_tmp)
        meta_tmp = None
        if meta is not None:
            meta_tmp = _tmp(meta_path(self.prefix))
            with open(meta_tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.write("\n")
        if os.path.exists(idx_path(self.prefix)):
            os.unlink(idx_path(self.prefix))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        if meta_tmp is not None:
            os.replace(meta_tmp, meta_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))

    def _write_index(self, path: str) -> None:
        lengths = (
            np.frombuffer(self._lengths, dtype=np.int32)
            if self._lengths
            else np.zeros(0, dtype=np.int32)
        )
        n_seq = len(lengths)
        n_doc = len(self._doc_indices) if self._doc_indices is not None else n_seq + 1
        with open(path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<QQ", n_seq, n_doc))
            f.write(lengths.tobytes())
            running = 0
            for lo in range(0, n_seq, _BLOCK):
                block = lengths[lo : lo + _BLOCK].astype(np.int64)
                ends = np.cumsum(block)
                starts = (ends - block + running) * self.dtype.itemsize
                f.write(starts.tobytes())
                running += int(ends[-1])
            if self._doc_indices is not None:
                f.write(np.frombuffer(self._doc_indices, dtype=np.int64).tobytes())
            else:
                for lo in range(0, n_seq + 1, _BLOCK):
                    f.write(np.arange(lo, min(lo + _BLOCK, n_seq + 1), dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        """Close and remove the temporary files."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, _tmp(idx_path(self.prefix)), _tmp(meta_path(self.prefix))):
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


def merge_datasets(
    prefixes: list[str], output_prefix: str, meta: dict | None = None
) -> DatasetIndex:
    """Concatenate datasets in the given order into ``output_prefix``; return its index."""
    if not prefixes:
        raise ValueError("nothing to merge")
    indices = [read_index(p) for p in prefixes]  # validates every part before writing
    dtypes = {str(i.dtype) for i in indices}
    if len(dtypes) != 1:
        raise ValueError(f"parts have different token dtypes: {sorted(dtypes)}")
    if os.path.realpath(output_prefix) in {os.path.realpath(p) for p in prefixes}:
        raise ValueError("the output prefix must differ from every input prefix")
    with IndexedWriter(output_prefix, indices[0].dtype) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
        writer.finalize(meta)
    return read_index(output_prefix)
