"""The Megatron-Core MM v2 model computes the reference model's function, in every layout.

Weights come from one reference model (paper layout) converted to the Megatron layout and
sharded for each rank; gradients are gathered back to full tensors and converted to the
paper layout, so every comparison is name by name against the plain reference.
"""

from __future__ import annotations

import pytest
import torch
from mm_testing import (
    assert_grads_close,
    batch,
    init_parallel,
    megatron_loss_and_grads,
    reference_loss_and_grads,
    tiny_config,
)
from mp_harness import run_ranks

from mm_megatron.config import ParallelConfig
from mm_megatron.convert.mm_layout import megatron_to_reference, reference_to_megatron
from mm_megatron.reference import ReferenceMMModel

LTM_OFFSET = 4


def _reference(cfg, microbatches, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceMMModel(cfg)
    ref.ltm_offset = LTM_OFFSET
    losses, grads = [], None
    for data in microbatches:
        loss, g = reference_loss_and_grads(ref, data)
        losses.append(loss)
        grads = g if grads is None else {k: grads[k] + g[k] for k in g}
    n = len(microbatches)
    return ref, sum(losses) / n, {k: v / n for k, v in grads.items()}


def _megatron_worker(rank, world, cfg, parallel, full_state, microbatches):
    init_parallel(parallel)
    loss, grads, _, _ = megatron_loss_and_grads(cfg, parallel, full_state, microbatches, LTM_OFFSET)
    return loss, grads


CONFIGS = {
    "default": {},
    "without_ltm": {"long_term_memory": False},
    "fig11_span_chunked": {"stm_span": "fig11", "scan_chunk_size": 5},
}


def _tp1_worker(rank, world):
    out = {}
    for name, overrides in CONFIGS.items():
        cfg = tiny_config(**overrides)
        mbs = [batch(cfg, seed=1)]
        _, ref_loss, ref_grads = _reference(cfg, mbs)
        ref, *_ = _reference(cfg, mbs)
        full = reference_to_megatron(ref.state_dict(), cfg)
        init_parallel(ParallelConfig())
        loss, grads, _, _ = megatron_loss_and_grads(cfg, ParallelConfig(), full, mbs, LTM_OFFSET)
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        out[name] = (ref_loss, ref_grads, loss, megatron_to_reference(grads, cfg))
    return out


def test_megatron_layer_matches_reference_fp32():
    """Same weights → same loss and gradients (fp32), for LTM on/off and both STM spans."""
    (results,) = run_ranks(_tp1_worker, 1)
    for name, (ref_loss, ref_grads, loss, grads) in results.items():
        assert abs(loss - ref_loss) < 1e-5, (name, loss, ref_loss)
        assert_grads_close(grads, ref_grads)


LAYOUTS = {
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "tp2_sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_single_process(layout):
    """TP=2 (with and without SP) and PP=2 on gloo: same loss and full gradients as one
    process running the reference, over two micro-batches."""
    cfg = tiny_config()
    mbs = [batch(cfg, seed=2), batch(cfg, seed=3)]
    ref, ref_loss, ref_grads = _reference(cfg, mbs)
    full = reference_to_megatron(ref.state_dict(), cfg)
    results = run_ranks(_megatron_worker, 2, cfg, LAYOUTS[layout], full, mbs)
    for loss, grads in results:
        assert abs(loss - ref_loss) < 1e-5, (layout, loss, ref_loss)
        assert_grads_close(megatron_to_reference(grads, cfg), ref_grads)
