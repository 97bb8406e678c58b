"""The document layout of a batch as Megatron's ``packed_seq_params`` for the MM v2 memories.

Megatron hands ``packed_seq_params`` (a :class:`PackedSeqParams`) from ``GPTModel.forward``
through the transformer block to every layer's ``self_attention``, and, under full
activation recompute, to the recomputed layers by closure. :class:`MMPackedSeqParams` is that
object for MM v2: the rows stay ``[b, s]`` (``qkv_format="sbhd"``, no ``cu_seqlens``) and the
documents are given per token, as ``doc_pos`` (the position of each token within its
document, what Megatron's ``GPTDataset`` yields as ``position_ids`` with
``reset_position_ids=True``).

Per-token positions rather than ``cu_seqlens``: the memories read them per token (the key
scan restarts where ``doc_pos == 0``, Eq. 8; the value shift stops at a document's end,
Eq. 9; the visible-pair counts of the adaptive bandwidth, Eq. 6; the lag masks
``p - j <= doc_pos[p]`` of Eq. 10), and a row's first token may continue a document
(``doc_pos > 0``), which segment boundaries cannot say. The object also carries the
FlexAttention block masks of that layout (:class:`~mm_megatron.ops.memory_masks.MemoryMasks`),
built once per forward pass and shared by every layer and by activation recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from mm_megatron.ops.memory_attention import new_memory_masks
from mm_megatron.ops.memory_masks import MemoryMasks

__all__ = ["MMPackedSeqParams"]


@dataclass(kw_only=True)
class MMPackedSeqParams(PackedSeqParams):
    """Documents of a ``[b, s]`` batch for the MM v2 memories (see the module docstring).

    Args:
        doc_pos: ``[b, s]`` integer position of each token within its document.
        masks: the block masks of ``doc_pos`` for this forward pass, or None (each layer
            call then builds its own where the read needs them).
    """

    qkv_format: str = "sbhd"
    doc_pos: torch.Tensor
    masks: MemoryMasks | None = None

    def __post_init__(self) -> None:
        if self.qkv_format != "sbhd":
            raise ValueError(
                "MMPackedSeqParams describes [batch, seq] rows (qkv_format 'sbhd'); the MM v2 "
                f"memories do not read THD-packed sequences, got qkv_format {self.qkv_format!r}"
            )
        doc_pos = self.doc_pos
        if doc_pos.dim() != 2 or doc_pos.is_floating_point() or doc_pos.is_complex():
            raise ValueError(
                "MMPackedSeqParams.doc_pos must be an integer tensor [batch, seq], got "
                f"{tuple(doc_pos.shape)} {doc_pos.dtype}"
            )
        if self.masks is not None:
            if not isinstance(self.masks, MemoryMasks):
                raise ValueError(
                    "MMPackedSeqParams.masks must be None or the MemoryMasks of doc_pos, got "
                    f"{type(self.masks).__name__}"
                )
            self.masks.check_layout(doc_pos)

    @classmethod
    def for_doc_pos(cls, doc_pos: torch.Tensor) -> MMPackedSeqParams:
        """The layout ``doc_pos`` with its block masks (built lazily, the way this device
        runs the memory read: only the flex backend builds any)."""
        return cls(doc_pos=doc_pos, masks=new_memory_masks(doc_pos))

    def check_batch(self, batch: int, seq: int) -> None:
        """Raise unless ``doc_pos`` is ``[batch, seq]`` (the rows of the layer's input)."""
        if tuple(self.doc_pos.shape) != (batch, seq):
            raise ValueError(
                "packed_seq_params.doc_pos must be [batch, seq] = "
                f"[{batch}, {seq}] like the layer's input, got {tuple(self.doc_pos.shape)}"
            )
