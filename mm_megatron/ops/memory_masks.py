"""FlexAttention block masks of the memories (Eq. 10), built once per micro-batch.

Query p reads key j iff ``min_lag <= p - j <= max_lag`` and j is in p's document
(``p - j <= doc_pos[p]``). The lags enter the ``mask_mod`` as 0-d tensors, not Python ints:
torch.compile guards on the values of captured Python numbers, so an int offset m (drawn
anew every training step) would recompile the FlexAttention kernels at every new m, and,
past dynamo's recompile limit, silently fall back to eager FlexAttention (which
materialises the ``[B, H, T, T]`` scores). Captured tensors are guarded on dtype, shape and
device only: one compiled kernel serves every m and both memories (an unbounded ``max_lag``
is the equivalent bound ``T - 1``, as ``p - j <= doc_pos[p] <= T - 1`` anyway).

:class:`MemoryMasks` holds the masks of one document layout. The model builds one per
forward pass and hands it to every layer; with activation recompute the same object is
reused when the layers run again in the backward pass, so each distinct mask is built once
per micro-batch. Its lifetime is that of the forward pass and its autograd graph, not a
global cache keyed on tensor identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    HAS_FLEX = True
except ImportError:  # pragma: no cover - torch without FlexAttention
    BlockMask = Any  # type: ignore[misc,assignment]
    create_block_mask = None  # type: ignore[assignment]
    HAS_FLEX = False

__all__ = ["HAS_FLEX", "MemoryMasks", "memory_mask_mod", "lag_tensors"]

# The mask_mod signature of FlexAttention: (batch, head, query index, key index) -> bool.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BlockMaskBuilder = Callable[..., Any]


def lag_tensors(
    doc_pos: torch.Tensor, min_lag: int, max_lag: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min_lag, max_lag)`` as 0-d int64 tensors on ``doc_pos``'s device; ``None`` → T - 1."""
    upper = doc_pos.shape[-1] - 1 if max_lag is None else max_lag
    device = doc_pos.device
    return (
        torch.full((), min_lag, dtype=torch.int64, device=device),
        torch.full((), upper, dtype=torch.int64, device=device),
    )


def memory_mask_mod(doc_pos: torch.Tensor, min_lag: torch.Tensor, max_lag: torch.Tensor) -> MaskMod:
    """mask_mod of Eq. 10: query p reads key j iff min_lag <= p-j <= max_lag, same document.

    ``min_lag`` and ``max_lag`` are 0-d tensors (see the module docstring), so the compiled
    kernels do not depend on their values.
    """

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        lag = q_idx - kv_idx
        return (lag >= min_lag) & (lag <= max_lag) & (lag <= doc_pos[b, q_idx])

    return mask_mod


class MemoryMasks:
    """The block masks of one document layout (one micro-batch), built on first use.

    ``block_mask(min_lag, max_lag)`` builds the ``BlockMask`` of a memory span once and then
    returns the same object, whichever layer asks and whether it runs for the first time or
    again under activation recompute. Build it from the micro-batch's ``doc_pos`` in the
    model's forward pass and pass it to every layer (the layers check that their
    ``doc_pos`` is that tensor or a detached view of it).

    Args:
        doc_pos: ``[B, T]`` integer position of each token within its document.
        builder: ``create_block_mask`` or a compiled version of it (same signature).
    """

    def __init__(self, doc_pos: torch.Tensor, builder: BlockMaskBuilder | None = None) -> None:
        if doc_pos.dim() != 2 or doc_pos.is_floating_point() or doc_pos.is_complex():
            raise ValueError(
                "MemoryMasks needs integer doc positions of shape [batch, seq], got "
                f"{tuple(doc_pos.shape)} {doc_pos.dtype}"
            )
        self.doc_pos = doc_pos
        self._builder = builder
        self._masks: dict[tuple[int, int | None], BlockMask] = {}

    def __len__(self) -> int:
        """Number of block masks built so far."""
        return len(self._masks)

    def check_layout(self, doc_pos: torch.Tensor) -> None:
        """Raise unless ``doc_pos`` is this object's tensor (or a detached view of it)."""
        mine = self.doc_pos
        if (
            doc_pos.shape != mine.shape
            or doc_pos.device != mine.device
            or doc_pos.data_ptr() != mine.data_ptr()
            or doc_pos.stride() != mine.stride()
        ):
            raise ValueError(
                "MemoryMasks were built for another doc_pos tensor (shape "
                f"{tuple(mine.shape)}) than the one given ({tuple(doc_pos.shape)}); build "
                "them from the doc positions this forward pass uses"
            )

    def block_mask(self, min_lag: int, max_lag: int | None) -> BlockMask:
        """The ``BlockMask`` of the span ``min_lag <= p - j <= max_lag`` (Eq. 10)."""
        key = (min_lag, max_lag)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = self._build(min_lag, max_lag)
        return mask

    def _build(self, min_lag: int, max_lag: int | None) -> BlockMask:
        if not HAS_FLEX:
            raise RuntimeError("FlexAttention is not available in this torch build")
        doc_pos = self.doc_pos
        B, T = doc_pos.shape
        builder = self._builder or create_block_mask
        # Masks carry no gradient; building them outside autograd also keeps one compiled
        # builder for training, evaluation and recompute alike.
        with torch.no_grad():
            return builder(
                memory_mask_mod(doc_pos, *lag_tensors(doc_pos, min_lag, max_lag)),
                B,
                None,
                T,
                T,
                device=doc_pos.device,
            )
