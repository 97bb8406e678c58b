"""The performance switches compute the same function with them on as off.

* selective recompute of the memory core (``train.recompute: selective``): loss and every
  parameter gradient equal the run without recompute (rtol 1e-6; the recompute replays the
  same ops on the same inputs, so they agree to rounding or exactly), MM v2 and baseline;
* the bias-SwiGLU fusion (Megatron's fused SwiGLU autograd function; on CPU its kernels run
  eagerly, as compiling them with Inductor takes minutes): same loss and gradients (1e-6).
"""

from __future__ import annotations

import pytest
from mm_testing import batch, tiny_config
from mp_harness import run_ranks

SWITCHES = {
    "selective_recompute": dict(recompute_granularity="selective"),
    "bias_swiglu_fusion": dict(bias_activation_fusion=True),
}


def _loss_and_grads(cfg, overrides, data):
    from mm_megatron.config import ParallelConfig
    from mm_megatron.layers.memories import set_ltm_offset
    from mm_megatron.model import build_model, document_causal_mask, transformer_config

    config = transformer_config(cfg, ParallelConfig(), **overrides)
    model = build_model(cfg, config, init_seed=7)
    set_ltm_offset(model, 4 if cfg.arch == "mm" else None)
    mask = None if cfg.arch == "mm" else document_causal_mask(data["doc_pos"])
    out = model(data["tokens"], data["doc_pos"], mask, labels=data["labels"])
    loss = out.float().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world):
    import contextlib

    import torch._dynamo
    from mm_testing import init_parallel

    from mm_megatron.config import ParallelConfig
    from mm_megatron.layers.memories import MMMemories

    init_parallel(ParallelConfig())
    calls = []
    core = MMMemories._memory_core
    MMMemories._memory_core = lambda self, *a, **k: calls.append(1) or core(self, *a, **k)
    results = {}
    for arch in ("mm", "transformer"):
        for switch, overrides in SWITCHES.items():
            eager = switch == "bias_swiglu_fusion"  # the fused SwiGLU kernels, run eagerly
            # The memories read through FlexAttention (the GPU path) where dynamo stays on.
            cfg = tiny_config(arch=arch, memory_backend="dense" if eager else "flex")
            data = batch(cfg, seed=3)
            with torch._dynamo.config.patch(disable=True) if eager else contextlib.nullcontext():
                base = _loss_and_grads(cfg, {}, data)
                calls.clear()
                results[arch, switch] = base, _loss_and_grads(cfg, overrides, data), len(calls)
    return results


TOL = {"selective_recompute": 1e-6, "bias_swiglu_fusion": 1e-5}
_RESULTS: dict = {}


@pytest.mark.parametrize("arch", ["mm", "transformer"])
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_switch_computes_the_same_function(arch, switch):
    if not _RESULTS:  # one process computes every case (imports dominate the time)
        (_RESULTS["all"],) = run_ranks(_worker, 1)
    base, switched, core_calls = _RESULTS["all"][arch, switch]
    if arch == "mm":  # 2 layers; selective recompute runs each memory core a second time
        assert core_calls == (4 if switch == "selective_recompute" else 2)
    assert switched[0] == pytest.approx(base[0], rel=TOL[switch])
    assert set(switched[1]) == set(base[1])
    for name, grad in base[1].items():
        if name.endswith(".weight"):
            assert grad.abs().sum() > 0, name
        diff = (switched[1][name] - grad).double().norm()
        assert diff <= TOL[switch] * grad.double().norm(), (name, diff.item(), grad.norm())
