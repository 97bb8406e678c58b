"""Associative memory reads (Eq. 4) under the short/long-term masks of Eq. 10, by backend.

y_p = Σ_j softmax_j(q_p · k_j) v_j over the pairs j with ``min_lag <= p - j <= max_lag`` in
the same document (short-term memory: min_lag 1, max_lag h-1; long-term memory: min_lag m,
max_lag None). q already carries the adaptive bandwidth β(n) of Eq. 6, so the softmax scale
is 1. Queries with no allowed pair output exactly 0 with finite gradients.

Backends:

* ``"dense"``: :func:`mm_megatron.ops.naive.memory_attention_dense` (T x T mask; reference and
  CPU fallback).
* ``"flex"``: FlexAttention with a block-sparse ``BlockMask`` built from a mask_mod
  (document ∧ lag window); no dense per-head mask. Compiled on CUDA; eager on CPU, where it
  is only meant for testing (torch's eager path materialises the scores).
* ``"auto"``: ``"flex"`` on CUDA when FlexAttention is importable, ``"dense"`` otherwise.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from mm_megatron.ops.naive import memory_attention_dense, visible_pairs

try:
    from torch.nn.attention.flex_attention import (
        BlockMask,
        create_block_mask,
        flex_attention,
    )

    HAS_FLEX = True
except ImportError:  # pragma: no cover - torch without FlexAttention
    BlockMask = Any  # type: ignore[misc,assignment]
    HAS_FLEX = False

try:  # eager autograd entry point, used for backward on CPU only (see _flex_cpu)
    from torch._higher_order_ops.flex_attention import flex_attention as _flex_hop
except ImportError:  # pragma: no cover
    _flex_hop = None

__all__ = ["MEMORY_BACKENDS", "HAS_FLEX", "memory_attention", "clear_block_mask_cache"]

MEMORY_BACKENDS = ("auto", "dense", "flex")

_BLOCK_MASK_CACHE_SIZE = 16
_block_mask_cache: OrderedDict[tuple, tuple[torch.Tensor, Any]] = OrderedDict()
_compiled_flex: Callable[..., torch.Tensor] | None = None


def clear_block_mask_cache() -> None:
    """Drop every cached ``BlockMask`` (and the references they hold to ``doc_pos``)."""
    _block_mask_cache.clear()


def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _memory_mask_mod(doc_pos: torch.Tensor, min_lag: int, max_lag: int | None) -> Callable:
    """mask_mod of Eq. 10: query p reads key j iff min_lag <= p-j <= max_lag, same document."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        lag = q_idx - kv_idx
        ok = (lag >= min_lag) & (lag <= doc_pos[b, q_idx])
        if max_lag is not None:
            ok = ok & (lag <= max_lag)
        return ok

    return mask_mod


def memory_block_mask(doc_pos: torch.Tensor, min_lag: int, max_lag: int | None) -> BlockMask:
    """``BlockMask`` for the memory of Eq. 10 (batch from ``doc_pos``, heads broadcast).

    Cached in a small LRU keyed on the identity and version of ``doc_pos`` plus the lags,
    shape and device; the cache keeps ``doc_pos`` alive so its identity cannot be reused
    while an entry exists. Several layers share one ``doc_pos`` per step, so they share
    one mask.
    """
    if not HAS_FLEX:
        raise RuntimeError("FlexAttention is not available in this torch build")
    key = (
        id(doc_pos),
        doc_pos._version,
        min_lag,
        max_lag,
        tuple(doc_pos.shape),
        str(doc_pos.device),
    )
    hit = _block_mask_cache.get(key)
    if hit is not None and hit[0] is doc_pos:
        _block_mask_cache.move_to_end(key)
        return hit[1]
    B, T = doc_pos.shape
    block_mask = create_block_mask(
        _memory_mask_mod(doc_pos, min_lag, max_lag),
        B,
        None,
        T,
        T,
        device=doc_pos.device,
        _compile=doc_pos.is_cuda,
    )
    _block_mask_cache[key] = (doc_pos, block_mask)
    while len(_block_mask_cache) > _BLOCK_MASK_CACHE_SIZE:
        _block_mask_cache.popitem(last=False)
    return block_mask


def _identity_score(
    score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    return score


def _flex_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """Eager FlexAttention on CPU (testing only).

    The public entry point refuses inputs that require grad on CPU; the eager autograd
    implementation behind it (torch's reference math for FlexAttention) runs fine there, so
    it is called directly when a backward pass is needed.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not needs_grad:
        return flex_attention(q, k, v, block_mask=block_mask, scale=1.0)
    if _flex_hop is None:
        raise NotImplementedError(
            "FlexAttention backward is unavailable on CPU in this torch; use backend='dense'"
        )
    return _flex_hop(q, k, v, _identity_score, block_mask.as_tuple(), 1.0, {})[0]


def _memory_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_pos: torch.Tensor,
    min_lag: int,
    max_lag: int | None,
) -> torch.Tensor:
    block_mask = memory_block_mask(doc_pos, min_lag, max_lag)
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if q.is_cuda:
        out = _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=1.0)
    else:
        out = _flex_cpu(q, k, v, block_mask)
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
    Returns:
        ``[B, H, T, Dv]`` in ``v``'s dtype; exactly 0 on rows with no allowed pair.
    """
    _check_inputs(q, k, v, doc_pos, min_lag, max_lag)
    if resolve_backend(backend, q.device) == "flex":
        return _memory_attention_flex(q, k, v, doc_pos, min_lag, max_lag)
    return memory_attention_dense(q, k, v, doc_pos, min_lag, max_lag)
