"""Document layouts in Megatron's ``packed_seq_params``.

* The TE baseline: document positions → cu_seqlens / PackedSeqParams (THD), checked on a
  hand-made batch, and the dense mask of the local baseline equals the mask those cu_seqlens
  imply.
* MM v2: :class:`MMPackedSeqParams` refuses what the memories cannot read (clear errors), and
  the model gives the same logits whether it builds the object from ``position_ids`` or is
  handed one.
"""

from __future__ import annotations

import pytest
import torch
from mm_testing import batch, init_parallel, tiny_config
from mp_harness import run_ranks

from mm_megatron.config import ModelConfig
from mm_megatron.layers.packed_seq import MMPackedSeqParams
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


def test_mm_packed_seq_params_validation():
    params = MMPackedSeqParams.for_doc_pos(DOC_POS)
    assert params.qkv_format == "sbhd" and params.cu_seqlens_q is None
    assert params.masks is not None and params.masks.doc_pos is DOC_POS
    params.check_batch(2, 6)
    with pytest.raises(ValueError, match=r"\[batch, seq\] = \[2, 5\]"):
        params.check_batch(2, 5)
    with pytest.raises(ValueError, match="integer tensor"):
        MMPackedSeqParams(doc_pos=DOC_POS.float())
    with pytest.raises(ValueError, match="integer tensor"):
        MMPackedSeqParams(doc_pos=DOC_POS.flatten())
    with pytest.raises(ValueError, match="THD"):
        MMPackedSeqParams(qkv_format="thd", doc_pos=DOC_POS)
    with pytest.raises(ValueError, match="another doc_pos"):
        MMPackedSeqParams(doc_pos=DOC_POS.clone(), masks=params.masks)
    with pytest.raises(ValueError, match="MemoryMasks"):
        MMPackedSeqParams(doc_pos=DOC_POS, masks=torch.zeros(2, 6))


def _mm_model_worker(rank, world):
    from megatron.core.packed_seq_params import PackedSeqParams

    from mm_megatron.config import ParallelConfig
    from mm_megatron.model import build_model, transformer_config
    from mm_megatron.packed import packed_seq_params

    init_parallel(ParallelConfig())
    cfg = tiny_config()
    data = batch(cfg, seed=1)
    tokens, doc_pos = data["tokens"], data["doc_pos"]
    model = build_model(cfg, transformer_config(cfg), init_seed=3).eval()
    layer = model.decoder.layers[0].self_attention
    hidden = torch.zeros(tokens.shape[1], tokens.shape[0], cfg.hidden_size)
    errors = {}
    for name, call in {
        "thd": lambda: model(tokens, doc_pos, packed_seq_params=packed_seq_params(doc_pos)),
        "mask": lambda: layer(hidden, attention_mask=doc_pos),
        "bias": lambda: layer(hidden, attention_bias=torch.zeros(1)),
        "plain": lambda: layer(hidden, packed_seq_params=PackedSeqParams(qkv_format="sbhd")),
        "shape": lambda: layer(hidden, packed_seq_params=MMPackedSeqParams(doc_pos=doc_pos.T)),
    }.items():
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    with torch.no_grad():
        implicit = model(tokens, doc_pos)
        given = model(tokens, packed_seq_params=MMPackedSeqParams.for_doc_pos(doc_pos))
        default = model(tokens)
        one_doc = model(
            tokens,
            packed_seq_params=MMPackedSeqParams(
                doc_pos=torch.arange(tokens.shape[1]).expand_as(tokens)
            ),
        )
    return errors, torch.equal(implicit, given), torch.equal(default, one_doc)


def test_mm_model_takes_documents_in_packed_seq_params():
    errors, same_given, same_default = run_ranks(_mm_model_worker, 1)[0]
    assert same_given and same_default
    assert "MMPackedSeqParams" in errors["thd"]
    assert errors["mask"] == errors["bias"]
    assert "attention_mask or attention_bias" in errors["mask"]
    assert "got PackedSeqParams" in errors["plain"]
    assert "[batch, seq] = [2, 24]" in errors["shape"]
