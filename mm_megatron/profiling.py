"""NVTX ranges for profiling the MM v2 hot path with Nsight Systems.

``nvtx_range(name)`` marks a region of host code so that its GPU kernels show up under that
name in an ``nsys`` timeline. It is a no-op (no CUDA call, no allocation) when CUDA is not
available, and it can be switched off process-wide with ``MM_NVTX=0`` (the ranges cost a
few microseconds each, negligible next to the kernels they bracket).

Names used by the model: ``mm/linear_in``, ``mm/memory/<kind>``, ``mm/key_scan``,
``mm/memory_read``, ``mm/linear_out`` (see :mod:`mm_megatron.layers.memories`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def nvtx_enabled() -> bool:
    """True when NVTX ranges are emitted: CUDA is available and ``MM_NVTX`` is not ``0``."""
    return os.environ.get("MM_NVTX", "1") != "0" and torch.cuda.is_available()


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Push an NVTX range named ``name`` for the duration of the block (no-op without CUDA)."""
    if not nvtx_enabled():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_wrap(name: str, fn: F) -> F:
    """``fn`` run inside ``nvtx_range(name)``; ``fn`` itself when NVTX is off."""
    if not nvtx_enabled():
        return fn

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with nvtx_range(name):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
