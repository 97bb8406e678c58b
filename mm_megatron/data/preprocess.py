"""Corpus -> Megatron indexed dataset, with worker processes and multi-node sharding.

The main process streams raw records in input order and hands chunks of them to worker
processes, which decode, validate and tokenize them. At most ``max_in_flight`` chunks are
outstanding, and results are written in submission order, so memory stays bounded and the
output is byte-identical whatever the number of workers.

Multi-node runs shard the (deterministically ordered) input file list into contiguous,
size-balanced ranges; rank ``r`` of ``n`` writes ``PREFIX.part-r-of-n``, and
``merge_datasets`` concatenates the parts in rank order, giving the same bytes as a
single-node run over all files.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from .indexed import (
    IndexedWriter,
    bin_path,
    idx_path,
    optimal_dtype,
    read_index,
    remove_stale_temporaries,
)
from .inspection import read_meta
from .progress import Progress, human
from .provenance import tokenizer_fingerprint
from .readers import Chunk, ChunkReader, InputError, InputFile, decode_record, expand_inputs
from .tokenizers import Tokenizer, encode_batch, load_tokenizer


def default_workers() -> int:
    """The number of CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class PreprocessConfig:
    """Options of one preprocessing run (see ``tools/preprocess_data.py --help``)."""

    inputs: list[str]
    output_prefix: str
    tokenizer: str
    json_key: str = "text"
    input_format: str = "auto"
    text_unit: str = "file"
    workers: int = field(default_factory=default_workers)
    append_bos: bool = True
    append_eos: bool = True
    bos_token: str | None = None
    eos_token: str | None = None
    on_error: str = "fail"  # fail | skip
    rank: int | None = None
    world_size: int | None = None
    chunk_bytes: int = 1 << 20
    chunk_records: int = 1024
    max_in_flight: int | None = None
    progress: bool = True
    log_interval: float | None = None
    error_log: str | None = None
    max_errors_shown: int = 10
    start_method: str | None = None
    resume: bool = False  # keep an output that is complete for the same inputs and tokenizer


@dataclass
class Summary:
    """What a run wrote and skipped."""

    output_prefix: str
    files: int
    documents: int
    tokens: int
    skipped: dict[str, int]
    input_bytes: int
    output_bytes: int
    seconds: float
    workers: int
    rank: int = 0
    world_size: int = 1

    def format(self) -> str:
        """A human-readable multi-line summary."""
        secs = max(self.seconds, 1e-9)
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return "\n".join(
            [
                f"output     {self.output_prefix}.{{bin,idx}}  "
                f"(rank {self.rank} of {self.world_size})",
                f"files      {self.files}",
                f"documents  {self.documents:,}",
                f"tokens     {self.tokens:,}",
                f"skipped    {skipped:,}" + (f"  ({detail})" if detail else ""),
                f"input      {self.input_bytes / 1e6:,.1f} MB of text",
                f"output     {self.output_bytes / 1e6:,.1f} MB",
                f"time       {self.seconds:.1f} s with {self.workers} worker(s): "
                f"{human(self.documents / secs)} docs/s, {self.input_bytes / secs / 1e6:.2f} MB/s, "
                f"{human(self.tokens / secs)} tokens/s",
            ]
        )


class PreprocessError(RuntimeError):
    """Bad input in fail-fast mode, or an invalid configuration."""


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size from the arguments, else ``SLURM_PROCID``/``SLURM_NTASKS``."""
    if rank is None:
        rank = int(os.environ.get("SLURM_PROCID", 0))
    if world_size is None:
        world_size = int(os.environ.get("SLURM_NTASKS", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise PreprocessError(f"invalid rank {rank} of world size {world_size}")
    return rank, world_size


def part_prefix(prefix: str, rank: int, world_size: int) -> str:
    """The output prefix of rank ``rank`` in a ``world_size``-way run."""
    return f"{prefix}.part-{rank:05d}-of-{world_size:05d}"


def shard_files(files: list[InputFile], rank: int, world_size: int) -> list[InputFile]:
    """The contiguous, size-balanced range of ``files`` that belongs to ``rank``."""
    total = sum(f.size for f in files)
    mine, before = [], 0
    for i, f in enumerate(files):
        if total > 0:
            owner = int((before + f.size / 2) * world_size / total)
        else:
            owner = i * world_size // len(files)
        before += f.size
        if min(owner, world_size - 1) == rank:
            mine.append(f)
    return mine


# ----------------------------------------------------------------------------- workers

_STATE: dict = {}


@dataclass
class _Result:
    tokens: np.ndarray
    lengths: np.ndarray
    errors: list[tuple[int, int, str, str]]
    nbytes: int
    position: int


def _init_worker(
    spec: str,
    bos_token: str | None,
    eos_token: str | None,
    json_key: str,
    append_bos: bool,
    append_eos: bool,
    dtype: str,
    in_process: bool,
) -> None:
    """Load the tokenizer once per worker process."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    os.environ["RAYON_NUM_THREADS"] = "1"
    if not in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    tok = load_tokenizer(spec, bos_token=bos_token, eos_token=eos_token)
    _STATE.update(
        tok=tok,
        json_key=json_key,
        dtype=np.dtype(dtype),
        bos=tok.bos_id if append_bos else None,
        eos=tok.eos_id if append_eos else None,
    )


def _tokenize_chunk(chunk: Chunk) -> _Result:
    tok: Tokenizer = _STATE["tok"]
    bos, eos, dtype = _STATE["bos"], _STATE["eos"], _STATE["dtype"]
    errors: list[tuple[int, int, str, str]] = []
    texts: list[str] = []
    where: list[tuple[int, int]] = []
    for file_index, line, payload in chunk.records:
        text, kind, message = decode_record(chunk.kind, payload, _STATE["json_key"])
        if text is None:
            errors.append((file_index, line, kind, message))
        else:
            texts.append(text)
            where.append((file_index, line))
    try:
        encoded: list[list[int] | None] = list(encode_batch(tok, texts))
    except Exception:  # find the document that fails, keep the others
        encoded = []
        for text, (file_index, line) in zip(texts, where, strict=True):
            try:
                encoded.append(tok.encode(text))
            except Exception as exc:  # noqa: BLE001 - reported with file and line
                encoded.append(None)
                errors.append((file_index, line, "encode_error", f"{type(exc).__name__}: {exc}"))
    extra = (bos is not None) + (eos is not None)
    kept = []
    for ids, (file_index, line) in zip(encoded, where, strict=True):
        if ids is None:
            continue
        if not ids:
            errors.append((file_index, line, "empty", "document has no tokens"))
            continue
        kept.append(ids)
    lengths = np.fromiter((len(ids) + extra for ids in kept), dtype=np.int32, count=len(kept))
    tokens = np.empty(int(lengths.sum(dtype=np.int64)), dtype=dtype)
    pos = 0
    for ids in kept:
        if bos is not None:
            tokens[pos] = bos
            pos += 1
        tokens[pos : pos + len(ids)] = ids
        pos += len(ids)
        if eos is not None:
            tokens[pos] = eos
            pos += 1
    errors.sort(key=lambda e: (e[0], e[1]))
    return _Result(tokens, lengths, errors, chunk.nbytes, chunk.position)


def _ordered_results(
    reader: ChunkReader, cfg: PreprocessConfig, init_args: tuple
) -> Iterator[_Result | InputError]:
    """Tokenized chunks in input order, with bounded work in flight."""
    if cfg.workers <= 0:
        _init_worker(*init_args, True)
        for item in reader:
            yield item if isinstance(item, InputError) else _tokenize_chunk(item)
        return
    # "spawn" by default: forked workers of a process that loaded a Rust tokenizer were
    # measured to contend with each other and did not scale.
    ctx = multiprocessing.get_context(cfg.start_method or "spawn")
    limit = cfg.max_in_flight or 2 * cfg.workers + 2
    pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(*init_args, False))
    try:
        pending: deque = deque()
        for item in reader:
            pending.append(
                item if isinstance(item, InputError) else pool.apply_async(_tokenize_chunk, (item,))
            )
            while len(pending) >= limit:
                head = pending.popleft()
                yield head if isinstance(head, InputError) else head.get()
        while pending:
            head = pending.popleft()
            yield head if isinstance(head, InputError) else head.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- driver


def _complete_output(prefix: str, framing: dict) -> dict | None:
    """The sidecar of ``prefix`` when the dataset there is complete (index and data agree)
    and was made from the same inputs, tokenizer and framing; else None."""
    try:
        meta = read_meta(prefix)
        if meta is None or any(meta.get(k) != v for k, v in framing.items()):
            return None
        index = read_index(prefix)
    except (OSError, ValueError):
        return None
    if index.num_documents != meta.get("documents") or index.num_tokens != meta.get("tokens"):
        return None
    return meta


def preprocess(cfg: PreprocessConfig, log: TextIO | None = None) -> Summary:
    """Run one preprocessing job (this rank's share of the inputs); return its summary."""
    log = log or sys.stderr
    start = time.perf_counter()
    if cfg.on_error not in ("fail", "skip"):
        raise PreprocessError(f"on_error must be 'fail' or 'skip', not {cfg.on_error!r}")
    rank, world = resolve_rank(cfg.rank, cfg.world_size)
    all_files = expand_inputs(cfg.inputs, cfg.input_format)
    files = shard_files(all_files, rank, world)
    prefix = cfg.output_prefix if world == 1 else part_prefix(cfg.output_prefix, rank, world)
    remove_stale_temporaries(prefix, log)
    tok = load_tokenizer(cfg.tokenizer, bos_token=cfg.bos_token, eos_token=cfg.eos_token)
    for wanted, tid, what, flag in (
        (cfg.append_bos, tok.bos_id, "begin-of-text", "bos"),
        (cfg.append_eos, tok.eos_id, "end-of-text", "eos"),
    ):
        if wanted and tid is None:
            raise PreprocessError(
                f"{tok.name} has no {what} token; name one with "
                f"--{flag}-token or pass --no-append-{flag}"
            )
    dtype = optimal_dtype(tok.vocab_size)
    fingerprint = tokenizer_fingerprint(tok)
    framing = {
        "tokenizer_sha256": fingerprint,
        "json_key": cfg.json_key,
        "inputs": [f.path for f in files],
        "dtype": dtype.name,
        "bos_id": tok.bos_id if cfg.append_bos else None,
        "eos_id": tok.eos_id if cfg.append_eos else None,
    }
    if cfg.resume:
        done = _complete_output(prefix, framing)
        if done is not None:
            log.write(f"{prefix}: complete for these inputs and tokenizer; kept (--resume)\n")
            return Summary(
                prefix,
                len(files),
                done["documents"],
                done["tokens"],
                dict(done.get("skipped", {})),
                0,
                os.path.getsize(bin_path(prefix)) + os.path.getsize(idx_path(prefix)),
                time.perf_counter() - start,
                cfg.workers,
                rank,
                world,
            )
    spec = tok.name  # resolved "kind:path", so workers load exactly the same tokenizer
    init_args = (
        spec,
        cfg.bos_token,
        cfg.eos_token,
        cfg.json_key,
        cfg.append_bos,
        cfg.append_eos,
        dtype.str,
    )
    reader = ChunkReader(files, cfg.json_key, cfg.text_unit, cfg.chunk_bytes, cfg.chunk_records)
    label = f"[rank {rank}/{world}] " if world > 1 else ""
    progress = Progress(reader.total_bytes, label, cfg.progress, cfg.log_interval, log)
    skipped: Counter[str] = Counter()
    shown = 0
    error_log = open(cfg.error_log, "a", encoding="utf-8") if cfg.error_log else None  # noqa: SIM115

    def report(err: InputError) -> None:
        nonlocal shown
        if err.kind == "empty":  # no tokens: dropped and counted, as Megatron-LM drops them
            skipped[err.kind] += 1
            if error_log is not None:
                error_log.write(f"{err}\n")
            return
        if cfg.on_error == "fail":
            raise PreprocessError(
                f"{err}\n(pass --on-error skip to skip bad records and count them in the summary)"
            )
        skipped[err.kind] += 1
        if error_log is not None:
            error_log.write(f"{err}\n")
        if shown < cfg.max_errors_shown:
            shown += 1
            log.write(f"\nskipped {err}\n" if progress.tty else f"skipped {err}\n")
            if shown == cfg.max_errors_shown:
                log.write("(further skipped records are only counted)\n")

    results = _ordered_results(reader, cfg, init_args)
    try:
        with IndexedWriter(prefix, dtype) as writer:
            for result in results:
                if isinstance(result, InputError):
                    report(result)
                    continue
                for file_index, line, kind, message in result.errors:
                    report(InputError(files[file_index].path, line, kind, message))
                writer.add_documents(result.tokens, result.lengths)
                progress.update(
                    len(result.lengths), int(result.tokens.size), result.nbytes, result.position
                )
            meta = {
                **framing,
                "tokenizer": tok.name,
                "tokenizer_files": [str(p) for p in tok.files()],
                "vocab_size": tok.vocab_size,
                "documents": writer.num_documents,
                "tokens": writer.num_tokens,
                "skipped": dict(sorted(skipped.items())),
                "rank": rank,
                "world_size": world,
            }
            writer.finalize(meta)
    finally:
        results.close()  # stops the worker pool now, also on failure
        if error_log is not None:
            error_log.close()
    progress.close()
    return Summary(
        prefix,
        len(files),
        writer.num_documents,
        writer.num_tokens,
        dict(sorted(skipped.items())),
        progress.nbytes,
        os.path.getsize(bin_path(prefix)) + os.path.getsize(idx_path(prefix)),
        time.perf_counter() - start,
        cfg.workers,
        rank,
        world,
    )
