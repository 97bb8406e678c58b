"""Disk space for checkpoints: what a checkpoint needs, a check before training, a clear error
when a save runs out of space, and removal of unpublished ``iter_*.tmp`` directories.

A run that cannot save would otherwise train for an interval, fail its save with a bare
``OSError``, be requeued and train into the same failure again. The check at start needs room
for ``keep_last + 1`` checkpoints (the ones kept, plus the one being written before the oldest
is removed), counting those already there; without a checkpoint yet it estimates the size as
14 bytes per parameter (bf16 weights, fp32 master weights and two fp32 Adam moments).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mm_megatron.checkpoint.format import ITER_PREFIX, MANIFEST, TMP_SUFFIX, iteration_of

BYTES_PER_PARAMETER = 14


class CheckpointSpaceError(RuntimeError):
    """Not enough space for checkpoints (final: a retry would fail the same way)."""


def checkpoint_bytes(path: Path) -> int:
    """Bytes of a published checkpoint, from its manifest (0 if unreadable)."""
    try:
        return sum(json.loads((path / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def parameter_count(model: list[Any]) -> int:
    """Parameters of the whole model (collective: sums the model-parallel shards)."""
    from megatron.core import parallel_state

    local = sum(p.numel() for chunk in model for p in chunk.parameters())
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def estimate(root: Path, model: list[Any]) -> tuple[int, str]:
    """(bytes one checkpoint needs, how that was found). Collective."""
    params = parameter_count(model)
    published = sorted(p for p in root.glob(f"{ITER_PREFIX}*") if not p.name.endswith(TMP_SUFFIX))
    for path in reversed(published):
        size = checkpoint_bytes(path)
        if size:
            return size, f"the size of {path.name}"
    return BYTES_PER_PARAMETER * params, f"{BYTES_PER_PARAMETER} bytes x {params:,} parameters"


def check_space(root: str, keep_last: int | None, model: list[Any]) -> str:
    """Raise CheckpointSpaceError when ``root`` cannot hold the checkpoints this run keeps
    (collective: every rank gets rank 0's verdict). Returns a one-line summary."""
    base = Path(root)
    size, how = estimate(base, model)
    verdict: list[str | None] = [None, None]
    if dist.get_rank() == 0:
        existing = sum(
            checkpoint_bytes(p)
            for p in base.glob(f"{ITER_PREFIX}*")
            if not p.name.endswith(TMP_SUFFIX)
        )
        slots = keep_last + 1 if keep_last is not None else 1
        need = max(size, slots * size - existing) if keep_last is not None else size
        free = shutil.disk_usage(base).free
        summary = (
            f"checkpoint space: {free:,} bytes free in {base}; a checkpoint takes about "
            f"{size:,} bytes ({how}); room needed for {slots} (keep_last + 1): "
            f"{need:,} bytes more"
        )
        verdict = [summary, None]
        if free < need:
            verdict[1] = (
                f"not enough space for checkpoints in {base}: {free:,} bytes free, {need:,} "
                f"needed ({slots} checkpoints of about {size:,} bytes ({how}), counting the "
                f"{existing:,} bytes already there). Free space, lower checkpoint.keep_last or "
                "move checkpoint.dir; resuming now would train into the same failed save"
            )
    dist.broadcast_object_list(verdict, src=0)
    if verdict[1]:
        raise CheckpointSpaceError(verdict[1])
    return str(verdict[0])


def is_out_of_space(err: BaseException) -> bool:
    """Whether ``err`` (or anything it wraps) is ENOSPC."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
    return False


def looks_full(root: str, tmp: Path) -> bool:
    """Whether a failed save probably ran out of space: torch's writer often reports ENOSPC
    as a garbled serialization error ("unexpected pos ..."), so judge by the free space left:
    less than the previous checkpoint (or 1 MiB) beside the partial directory."""
    free = shutil.disk_usage(root).free
    previous = max(
        (checkpoint_bytes(p) for p in Path(root).glob(f"{ITER_PREFIX}*") if p != tmp), default=0
    )
    return free < max(previous, 1 << 20)


def out_of_space_error(root: str, tmp: Path) -> CheckpointSpaceError:
    """The error for a save that ran out of space, after removing its partial directory."""
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(root).free
    previous = max((checkpoint_bytes(p) for p in Path(root).glob(f"{ITER_PREFIX}*")), default=0)
    needed = f"about {previous:,} bytes (the previous checkpoint)" if previous else "more"
    return CheckpointSpaceError(
        f"checkpoint save failed: no space left on device in {root}: {free:,} bytes free, a "
        f"checkpoint needs {needed}; the unpublished {tmp.name} was removed. Free space, lower "
        "checkpoint.keep_last or move checkpoint.dir before resubmitting"
    )


def remove_stale_tmp(root: str, below: int | None = None) -> list[str]:
    """Remove unpublished ``iter_*.tmp`` directories (all, or those below iteration
    ``below``: a newer one may be an asynchronous save in progress). Rank 0 only."""
    removed = []
    for path in sorted(Path(root).glob(f"{ITER_PREFIX}*{TMP_SUFFIX}")):
        iteration = iteration_of(path.name[: -len(TMP_SUFFIX)])
        if iteration is None:
            continue
        if below is None or iteration < below:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed
