"""Distributed checkpoints of MM v2 reshard: every parameter is declared with its true
tensor-parallel sharding (including the per-head scalars of the memories)."""

from __future__ import annotations

import torch
from mm_testing import build_stage, init_parallel, tiny_config
from mp_harness import run_ranks

from mm_megatron.config import ParallelConfig
from mm_megatron.convert.mm_layout import reference_to_megatron
from mm_megatron.reference import ReferenceMMModel


def _build(cfg, parallel):
    init_parallel(parallel, seed=99)  # a different init from the saved weights
    return build_stage(cfg, parallel)


def _save(rank, world, cfg, parallel, full, path):
    from megatron.core import dist_checkpointing

    from mm_megatron.parallel_layout import load_full_state_dict

    model, config = _build(cfg, parallel)
    load_full_state_dict(model, full, config)
    dist_checkpointing.save(model.sharded_state_dict(), path)
    return True


def _load(rank, world, cfg, parallel, path):
    from megatron.core import dist_checkpointing

    from mm_megatron.parallel_layout import gather_full_tensors

    model, config = _build(cfg, parallel)
    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state)
    return gather_full_tensors(model, dict(model.named_parameters()), config)


def test_tp2_checkpoint_loads_at_tp1_and_pp2(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    full = reference_to_megatron(ReferenceMMModel(cfg).state_dict(), cfg)
    path = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    run_ranks(_save, 2, cfg, ParallelConfig(tensor_model_parallel_size=2), full, path)
    layouts = [(1, ParallelConfig()), (2, ParallelConfig(pipeline_model_parallel_size=2))]
    for world, parallel in layouts:
        loaded = run_ranks(_load, world, cfg, parallel, path)[0]
        assert set(loaded) == set(full)
        for name, tensor in full.items():
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
