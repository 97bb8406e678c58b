"""Document-wise attention for the TE baseline: document positions → cu_seqlens /
PackedSeqParams (THD), checked on a hand-made batch, and the dense mask of the local baseline
equals the mask those cu_seqlens imply."""

from __future__ import annotations

import torch
from mm_testing import batch, tiny_config

from mm_megatron.config import ModelConfig
from mm_megatron.model import document_causal_mask
from mm_megatron.packed import (
    cu_seqlens_from_doc_pos,
    mask_from_cu_seqlens,
    packed_seq_params,
    uses_packed_sequences,
)

# Row 0: documents of 3, 1 and 2 tokens. Row 1: a document cut by the row start (positions
# 5, 6: the row begins a new segment), then one of 4 tokens.
DOC_POS = torch.tensor([[0, 1, 2, 0, 0, 1], [5, 6, 0, 1, 2, 3]])


def test_cu_seqlens_of_a_hand_made_batch():
    cu = cu_seqlens_from_doc_pos(DOC_POS)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 6, 8, 12]
    params = packed_seq_params(DOC_POS)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == cu.tolist()
    assert params.max_seqlen_q == params.max_seqlen_kv == 4


def test_mask_of_the_hand_made_batch():
    want = torch.zeros(2, 6, 6, dtype=torch.bool)  # True = may attend
    for row, docs in enumerate([[(0, 3), (3, 4), (4, 6)], [(0, 2), (2, 6)]]):
        for a, e in docs:
            want[row, a:e, a:e] = torch.ones(e - a, e - a, dtype=torch.bool).tril()
    got = mask_from_cu_seqlens(cu_seqlens_from_doc_pos(DOC_POS), 2, 6)
    assert torch.equal(got, ~want.unsqueeze(1))


def test_local_baseline_mask_equals_the_packed_one():
    for seed in range(5):
        doc_pos = batch(tiny_config(seq_length=40), batch_size=3, seed=seed)["doc_pos"]
        packed = mask_from_cu_seqlens(cu_seqlens_from_doc_pos(doc_pos), 3, 40)
        assert torch.equal(document_causal_mask(doc_pos), packed)


def test_only_the_te_baseline_packs():
    base = dict(num_layers=1, hidden_size=8, num_heads=2, ffn_hidden_size=8, vocab_size=16)
    assert not uses_packed_sequences(ModelConfig(arch="transformer", backend="local", **base))
    assert not uses_packed_sequences(ModelConfig(arch="mm", backend="local", **base))
    te = torch.cuda.is_available() and uses_packed_sequences(
        ModelConfig(arch="transformer", backend="auto", **base)
    )
    from mm_megatron.specs import transformer_engine_available

    assert te == transformer_engine_available()
