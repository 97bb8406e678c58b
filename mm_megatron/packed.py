"""Document-wise causal attention for the transformer baseline, by backend.

The baseline must see the same documents as MM v2's memories: query p attends to keys j of
its own document with j <= p. With the local backend that is the dense mask
:func:`mm_megatron.model.document_causal_mask`. With Transformer Engine the batch is packed
into one ``THD`` sequence whose documents are delimited by ``cu_seqlens`` (Megatron's
``PackedSeqParams``, ``qkv_format="thd"``), so TE's fused attention skips the masked pairs
instead of reading a dense mask (RoPE is then applied per document; attention depends only on
relative positions within a document, so this is the same function).

Every row starts a new segment: a row boundary always separates documents, as in the dense
mask, whatever the document position of the row's first token.
"""

from __future__ import annotations

from typing import Any

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.specs import resolve_backend


def uses_packed_sequences(mm: ModelConfig) -> bool:
    """True when the baseline runs document-wise attention through TE's THD path."""
    return mm.arch == "transformer" and resolve_backend(mm.backend) == "transformer_engine"


def segment_starts(doc_pos: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` bool: True where a segment (document piece within a row) starts."""
    starts = doc_pos == 0
    starts[:, 0] = True
    return starts


def cu_seqlens_from_doc_pos(doc_pos: torch.Tensor) -> torch.Tensor:
    """Cumulative segment lengths (int32, starting at 0, ending at ``b * s``) of the rows of
    ``doc_pos`` laid end to end."""
    starts = segment_starts(doc_pos).flatten().nonzero().flatten()
    end = torch.tensor([doc_pos.numel()], device=doc_pos.device)
    return torch.cat([starts, end]).to(torch.int32)


def packed_seq_params(doc_pos: torch.Tensor) -> Any:
    """Megatron ``PackedSeqParams`` (THD) for the batch ``doc_pos`` packed into one row."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens_from_doc_pos(doc_pos)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def mask_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Dense ``[b, 1, s, s]`` mask (True = masked) that THD attention over ``cu_seqlens``
    implies for the rows it was packed from (segments must not cross rows)."""
    n = batch * seq
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(
        torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=n
    ).view(batch, seq)
    idx = torch.arange(seq, device=cu_seqlens.device)
    allowed = (segment.unsqueeze(-1) == segment.unsqueeze(-2)) & (idx.view(-1, 1) >= idx)
    return (~allowed).unsqueeze(1)
