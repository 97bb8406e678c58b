"""Run a function on N gloo ranks in fresh processes (spawn) and collect each rank's result."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from mm_megatron.cpu_compat import enable_cpu_mode

    enable_cpu_mode()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo ranks; return their results by rank."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry,
            args=(fn, world, free_port(), out, args),
            nprocs=world,
            start_method="spawn",
            join=True,
        )
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
