"""Associative memory reads (Eq. 4) under the short/long-term masks of Eq. 10, by backend.

y_p = Σ_j softmax_j(q_p · k_j) v_j over the pairs j with ``min_lag <= p - j <= max_lag`` in
the same document (short-term memory: min_lag 1, max_lag h-1; long-term memory: min_lag m,
max_lag None). q already carries the adaptive bandwidth β(n) of Eq. 6, so the softmax scale
is 1. Queries with no allowed pair output exactly 0 with finite gradients.

Backends:

* ``"dense"``: :func:`mm_megatron.ops.naive.memory_attention_dense` (T x T mask; reference and
  CPU fallback).
* ``"flex"``: FlexAttention with a block-sparse ``BlockMask`` built from a mask_mod
  (document ∧ lag window; :mod:`mm_megatron.ops.memory_masks`); no dense per-head mask.
  Compiled on CUDA, once for every LTM offset m and both memories; eager on CPU unless
  :func:`configure_flex_compile` says otherwise (eager is only meant for testing: torch's
  eager path materialises the scores).
* ``"auto"``: ``"flex"`` on CUDA when FlexAttention is importable, ``"dense"`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mm_megatron.ops.memory_masks import HAS_FLEX, MemoryMasks
from mm_megatron.ops.naive import memory_attention_dense, visible_pairs

if HAS_FLEX:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
else:  # pragma: no cover - torch without FlexAttention
    BlockMask = Any  # type: ignore[misc,assignment]

try:  # eager autograd entry point, used for backward on CPU only (see _flex_read)
    from torch._higher_order_ops.flex_attention import flex_attention as _flex_hop
except ImportError:  # pragma: no cover
    _flex_hop = None

__all__ = [
    "MEMORY_BACKENDS",
    "HAS_FLEX",
    "MemoryMasks",
    "configure_flex_compile",
    "memory_attention",
    "new_memory_masks",
]

MEMORY_BACKENDS = ("auto", "dense", "flex")

CompileBackend = str | Callable[..., Any]


class _FlexCompile:
    """How the flex path compiles: the torch.compile backend, and whether CPU runs compile."""

    backend: CompileBackend = "inductor"
    on_cpu: bool = False
    read: Callable[..., torch.Tensor] | None = None
    builder: Callable[..., Any] | None = None


def configure_flex_compile(backend: CompileBackend = "inductor", *, on_cpu: bool = False) -> None:
    """Choose how the flex memory read and its block masks are compiled.

    CUDA always runs the compiled kernels. ``on_cpu=True`` compiles on CPU as well, with the
    same guards as on CUDA (used to test that every LTM offset m, both memories,
    training, evaluation and recompute share one compiled program; pass a backend that
    supports FlexAttention's backward on CPU, e.g. ``"aot_eager"``). Drops the compiled
    functions built so far (not dynamo's caches).
    """
    if not (callable(backend) or (isinstance(backend, str) and backend)):
        raise ValueError(f"flex compile backend must be a name or a callable, got {backend!r}")
    if not isinstance(on_cpu, bool):
        raise ValueError(f"on_cpu must be a bool, got {on_cpu!r}")
    _FlexCompile.backend, _FlexCompile.on_cpu = backend, on_cpu
    _FlexCompile.read = _FlexCompile.builder = None


def _compiles(device: torch.device) -> bool:
    return device.type == "cuda" or _FlexCompile.on_cpu


def new_memory_masks(doc_pos: torch.Tensor) -> MemoryMasks:
    """A :class:`MemoryMasks` for ``doc_pos`` whose masks are built the way this device
    runs them (a compiled ``create_block_mask`` where the flex read compiles)."""
    builder = None
    if HAS_FLEX and _compiles(doc_pos.device):
        if _FlexCompile.builder is None:
            _FlexCompile.builder = torch.compile(
                create_block_mask, dynamic=False, backend=_FlexCompile.backend
            )
        builder = _FlexCompile.builder
    return MemoryMasks(doc_pos, builder)


def _identity_score(
    score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    return score


def _flex_read(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """FlexAttention with softmax scale 1 (Eq. 4; q carries β(n) of Eq. 6).

    The public entry point refuses inputs that require grad on CPU; the autograd
    implementation behind it (torch's reference math for FlexAttention) runs fine there, so
    on CPU it is called directly when a backward pass may follow. Compiled as a whole on
    CUDA (and on CPU when configured), eager otherwise.
    """
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad
    if q.device.type != "cpu" or not needs_grad:
        return flex_attention(q, k, v, block_mask=block_mask, scale=1.0)
    if _flex_hop is None:
        raise NotImplementedError(
            "FlexAttention backward is unavailable on CPU in this torch; use backend='dense'"
        )
    return _flex_hop(q, k, v, _identity_score, block_mask.as_tuple(), 1.0, {})[0]


def _flex_reader(device: torch.device) -> Callable[..., torch.Tensor]:
    if not _compiles(device):
        return _flex_read
    if _FlexCompile.read is None:
        _FlexCompile.read = torch.compile(_flex_read, dynamic=False, backend=_FlexCompile.backend)
    return _FlexCompile.read


def _memory_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_pos: torch.Tensor,
    min_lag: int,
    max_lag: int | None,
    masks: MemoryMasks | None,
) -> torch.Tensor:
    if masks is None:
        masks = new_memory_masks(doc_pos)
    else:
        masks.check_layout(doc_pos)
    block_mask = masks.block_mask(min_lag, max_lag)
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    out = _flex_reader(q.device)(q, k, v, block_mask)
    # Rows with no allowed pair: force an exact 0 whatever the kernel returns there.
    nonempty = (visible_pairs(doc_pos, min_lag, max_lag) > 0)[:, None, :, None]
    return torch.where(nonempty, out, out.new_zeros(())).to(v.dtype)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_pos: torch.Tensor,
    min_lag: int,
    max_lag: int | None,
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be [B, H, T, D]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "q and k must have equal shapes and v the same [B, H, T]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, _, T, _ = q.shape
    if tuple(doc_pos.shape) != (B, T):
        raise ValueError(f"doc_pos must be [B, T] = {(B, T)}, got {tuple(doc_pos.shape)}")
    if doc_pos.is_floating_point() or doc_pos.is_complex():
        raise ValueError(f"doc_pos must be an integer tensor, got {doc_pos.dtype}")
    if not (q.device == k.device == v.device == doc_pos.device):
        raise ValueError("q, k, v and doc_pos must be on the same device")
    if not isinstance(min_lag, int) or min_lag < 0:
        raise ValueError(f"min_lag must be an int >= 0, got {min_lag!r}")
    if max_lag is not None and (not isinstance(max_lag, int) or max_lag < min_lag):
        raise ValueError(f"max_lag must be None or an int >= min_lag, got {max_lag!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` (one of :data:`MEMORY_BACKENDS`) to ``"dense"`` or ``"flex"``."""
    if backend not in MEMORY_BACKENDS:
        raise ValueError(
            f"unknown memory backend {backend!r}; expected one of {', '.join(MEMORY_BACKENDS)}"
        )
    if backend == "auto":
        return "flex" if (HAS_FLEX and device.type == "cuda") else "dense"
    if backend == "flex" and not HAS_FLEX:
        raise RuntimeError("backend 'flex' needs torch.nn.attention.flex_attention")
    return backend


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_pos: torch.Tensor,
    min_lag: int,
    max_lag: int | None,
    backend: str = "auto",
    masks: MemoryMasks | None = None,
) -> torch.Tensor:
    """Associative memory read of Eq. 4 with the memory masks of Eq. 10.

    Args:
        q: ``[B, H, T, D]`` queries, already scaled by β(n) of Eq. 6 (softmax scale 1).
        k: ``[B, H, T, D]`` unit keys (Eq. 8); v: ``[B, H, T, Dv]`` values (Eq. 9).
        doc_pos: ``[B, T]`` integer position of each token within its document.
        min_lag, max_lag: query p reads keys j with ``min_lag <= p - j <= max_lag`` (no upper
            bound if ``max_lag`` is None) in its own document. STM: ``(1, h - 1)``;
            LTM: ``(m, None)``.
        backend: one of :data:`MEMORY_BACKENDS`.
        masks: the block masks of this forward pass's ``doc_pos`` (flex backend; see
            :func:`new_memory_masks`). None: built for this call only.
    Returns:
        ``[B, H, T, Dv]`` in ``v``'s dtype; exactly 0 on rows with no allowed pair.
    """
    _check_inputs(q, k, v, doc_pos, min_lag, max_lag)
    if masks is not None and not isinstance(masks, MemoryMasks):
        raise ValueError(f"masks must be a MemoryMasks or None, got {type(masks).__name__}")
    if resolve_backend(backend, q.device) == "flex":
        return _memory_attention_flex(q, k, v, doc_pos, min_lag, max_lag, masks)
    return memory_attention_dense(q, k, v, doc_pos, min_lag, max_lag)
