"""CUDA checks of the fast MM v2 ops against the references (T=4096, B=2, H=4, D=128).

* compiled FlexAttention memories (Eq. 4 / Eq. 10) vs the dense masked softmax, computed in
  fp32 from the same inputs. Tolerances: fp32 inputs, outputs within 2e-4 and gradients
  within 2e-4 relative (Frobenius) error; bf16 inputs, outputs within 3e-2 absolute and
  gradients within 3e-2 relative error (bf16 I/O, fp32 accumulation in both).
* the compiled flex read and block-mask builder compile once (per grad mode) for many LTM
  offsets m and the STM, with dynamo raising on a recompile-limit hit.
* chunked gated key scan (Eq. 8) vs the literal recurrence. fp32 inputs against the
  recurrence in fp64: outputs within 1e-5, gradients within 1e-4 relative error. bf16
  inputs against the recurrence on the same bf16 inputs (both accumulate in fp32): outputs
  within 2e-2, gradients within 2e-2 relative error.
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch

from mm_megatron.ops import (
    gated_keys_chunked,
    gated_keys_naive,
    memory_attention,
    memory_attention_dense,
    visible_pairs,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ma_module = importlib.import_module("mm_megatron.ops.memory_attention")
B, H, T, D = 2, 4, 4096, 128
MEMORIES = {"stm": (1, 255), "ltm": (64, None)}


def doc_pos_cuda() -> torch.Tensor:
    """Row 0: one document. Row 1: documents of 1, 50, 700, 1 and 2000 tokens, then the rest."""
    row1, used = [], 0
    for n in (1, 50, 700, 1, 2000):
        row1.extend(range(n))
        used += n
    row1.extend(range(T - used))
    return torch.stack([torch.arange(T), torch.tensor(row1)]).cuda()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("memory", ["stm", "ltm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_matches_dense(memory, dtype):
    assert ma_module.HAS_FLEX
    lags = MEMORIES[memory]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", generator=g) * 8.0
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, device="cuda", generator=g), dim=-1)
    v = torch.randn(B, H, T, D, device="cuda", generator=g)
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    dp = doc_pos_cuda()
    up = torch.randn(B, H, T, D, device="cuda", generator=g)

    out = memory_attention(q, k, v, dp, *lags, backend="auto")  # flex on CUDA
    grads = torch.autograd.grad((out.float() * up).sum(), (q, k, v))
    ref = memory_attention_dense(q, k, v, dp, *lags)
    ref_grads = torch.autograd.grad((ref.float() * up).sum(), (q, k, v))

    tol = 2e-4 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < tol
    empty = (visible_pairs(dp, *lags) == 0)[:, None, :, None].expand_as(out)
    assert empty.any() and (out[empty] == 0).all()


def test_compiled_flex_compiles_once_over_offsets():
    """12 LTM offsets and the STM, each with a training and an evaluation read, on
    inductor: one compile of the flex read per grad mode and one of the mask builder."""
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend

    counts: Counter[tuple[str, bool]] = Counter()

    def backend(gm, example_inputs):
        kind = "flex_read" if "flex_attention" in gm.code else "block_mask"
        counts[(kind, torch.is_grad_enabled())] += 1
        return lookup_backend("inductor")(gm, example_inputs)

    old = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    ma_module.configure_flex_compile(backend)
    try:
        t = 1024
        g = torch.Generator(device="cuda").manual_seed(2)
        q = torch.randn(B, H, t, D, device="cuda", generator=g) * 8.0
        k = torch.nn.functional.normalize(torch.randn_like(q), dim=-1)
        v = torch.randn_like(q)
        q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
        dp = doc_pos_cuda()[:, :t].contiguous()
        for lags in [(1, 255)] + [(m, None) for m in range(64, 76)]:
            masks = ma_module.new_memory_masks(dp)
            out = memory_attention(q, k, v, dp, *lags, masks=masks)
            out.float().sum().backward()
            with torch.no_grad():
                ev = memory_attention(q.detach(), k.detach(), v.detach(), dp, *lags, masks=masks)
                ref = memory_attention_dense(q.detach(), k.detach(), v.detach(), dp, *lags)
            torch.testing.assert_close(ev.float(), ref.float(), rtol=3e-2, atol=3e-2)
    finally:
        ma_module.configure_flex_compile()
        torch._dynamo.config.fail_on_recompile_limit_hit = old
    assert counts == {
        ("flex_read", True): 1,
        ("flex_read", False): 1,
        ("block_mask", False): 1,
    }, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_scan_matches_naive_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    kt = torch.randn(B, H, T, D, device="cuda", generator=g, dtype=torch.float64)
    lg = torch.randn(B, H, T, device="cuda", generator=g, dtype=torch.float64) * 3.0
    ld = torch.rand(B, H, T, device="cuda", generator=g, dtype=torch.float64) * 2.0
    dp = doc_pos_cuda()
    up = torch.randn(B, H, T, D, device="cuda", generator=g)

    leaves = [x.to(dtype).requires_grad_() for x in (kt, lg, ld)]
    out = gated_keys_chunked(*leaves, dp)
    grads = torch.autograd.grad((out.float() * up).sum(), leaves)
    # reference: fp64 recurrence for fp32 inputs, same-dtype recurrence for bf16 inputs
    ref_in = [x.detach().double() if dtype == torch.float32 else x.detach() for x in leaves]
    ref_in = [x.requires_grad_() for x in ref_in]
    ref = gated_keys_naive(*ref_in, dp)
    ref_grads = torch.autograd.grad((ref.float() * up.to(ref.dtype)).sum(), ref_in)

    out_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=out_tol)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < grad_tol
