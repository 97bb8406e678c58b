"""Properties the paper's model must have, checked on the reference and the Megatron model.

* causality: changing token t+1 changes no output at positions <= t (catches a wrong mask
  diagonal or a wrong value shift);
* document isolation: a document's outputs do not depend on its neighbours in the pack;
* empty memories (a document's first tokens) give finite outputs and gradients;
* Table 6 initialisation.
"""

from __future__ import annotations

import math

import pytest
import torch
from mm_testing import init_parallel, tiny_config
from mp_harness import run_ranks

from mm_megatron.config import ParallelConfig
from mm_megatron.convert.mm_layout import reference_to_megatron
from mm_megatron.reference import ReferenceMMModel


def _doc_pos(lengths):
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def _check_properties(forward, cfg):
    """Run the property checks with ``forward(tokens, doc_pos) -> logits``."""
    T = cfg.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    one_doc = _doc_pos([T])
    base = forward(tokens, one_doc)
    for t in (0, 3, cfg.ltm_offset_inference, cfg.short_window, T - 2):
        changed = tokens.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % cfg.vocab_size
        out = forward(changed, one_doc)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])

    lengths = [9, 1, T - 10]  # includes a document of length 1
    packed = _doc_pos(lengths)
    out = forward(tokens, packed)
    neighbours = tokens.clone()
    neighbours[0, :9] = torch.randint(0, cfg.vocab_size, (9,), generator=g)
    neighbours[0, 10:] = torch.randint(0, cfg.vocab_size, (T - 10,), generator=g)
    torch.testing.assert_close(forward(neighbours, packed)[:, 9], out[:, 9], rtol=0, atol=1e-6)
    alone = forward(tokens[:, 10:], _doc_pos([T - 10]))
    torch.testing.assert_close(out[:, 10:], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


def test_reference_properties():
    cfg = tiny_config(seq_length=30)
    torch.manual_seed(0)
    model = ReferenceMMModel(cfg).double()
    _check_properties(lambda t, d: model(t, d), cfg)


def test_empty_memory_rows_give_finite_gradients():
    """Every first token reads two empty memories; no NaN reaches any gradient (β at n=0)."""
    cfg = tiny_config(seq_length=12)
    torch.manual_seed(0)
    model = ReferenceMMModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    logits = model(tokens, _doc_pos([1] * 12))  # twelve documents of length 1
    logits.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # With only empty memories every block's memory output is exactly 0, so the logits
    # are those of the model without its memories.
    z = model.embedding(tokens)
    for block in model.blocks:
        h = block.norm2(z)
        z = z + block.W2(torch.nn.functional.silu(block.W1(h)) * block.W3(h))
    torch.testing.assert_close(logits, model.W_c(model.final_norm(z)))


def test_table6_initialisation():
    cfg = tiny_config(num_layers=3, hidden_size=64, ffn_hidden_size=256, num_heads=4)
    torch.manual_seed(0)
    model = ReferenceMMModel(cfg)
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    for layer, block in enumerate(model.blocks):
        sigma = 1 / math.sqrt(2 * d * (layer + 1))
        mats = [block.W_o.weight, block.W1.weight, block.W3.weight]
        for mem in block.memories.values():
            mats += [mem.W_phi.weight, mem.W_psi.weight]
            assert torch.all(mem.beta0_raw == 1.5) and torch.all(mem.alpha_raw == 1 / 3)
            assert torch.all((mem.gamma >= 0) & (mem.gamma <= 1))
            assert torch.all(mem.value_scale_raw == 0)
        for w in mats:
            assert w.abs().max() <= 3 * sigma + 1e-7
            # N(0, σ) truncated at ±3σ has standard deviation 0.9866 σ.
            assert abs(w.std().item() / sigma - 0.9866) < 0.05
        w2 = block.W2.weight
        assert w2.abs().max() <= 3 / math.sqrt(2 * f * (layer + 1)) + 1e-7
    emb_sigma = 1 / math.sqrt(2 * d)
    assert model.embedding.weight.abs().max() <= 3 * emb_sigma + 1e-7


def _megatron_properties_worker(rank, world, cfg, full):
    from mm_megatron.model import build_model, transformer_config
    from mm_megatron.parallel_layout import load_full_state_dict

    init_parallel(ParallelConfig())
    config = transformer_config(cfg, params_dtype=torch.float32)
    model = build_model(cfg, config)
    load_full_state_dict(model, full, config)
    model.eval()
    with torch.no_grad():
        _check_properties(lambda t, d: model(t, d.expand(t.shape[0], -1)), cfg)
    return True


@pytest.mark.parametrize("chunk", [4, 64])
def test_megatron_model_properties(chunk):
    """The same properties on the Megatron model with the fast ops (chunked scan)."""
    cfg = tiny_config(seq_length=30, scan_chunk_size=chunk)
    torch.manual_seed(0)
    full = reference_to_megatron(ReferenceMMModel(cfg).state_dict(), cfg)
    assert run_ranks(_megatron_properties_worker, 1, cfg, full) == [True]
