"""CUDA checks of the fused Triton key scan (Eq. 8) at realistic shapes (B=2, H=32, T=4096,
D=128) against the chunked torch scan and the literal recurrence.

Tolerances: fp32 inputs, outputs within 1e-5 and gradients within 1e-4 relative (Frobenius)
error of the torch scan (both fp32), and of the fp64 recurrence on 4 heads; bf16 inputs,
outputs within 2e-2 and gradients within 2e-2 relative error of the torch scan on the same
bf16 inputs (both accumulate in fp32, the gap is bf16 rounding of the outputs/gradients).
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.ops import gated_key_scan, gated_keys_naive
from mm_megatron.ops.triton_scan import HAS_TRITON

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package"),
]

B, H, T, D = 2, 32, 4096, 128


def doc_pos_cuda() -> torch.Tensor:
    """Row 0: one document. Row 1: documents of 1, 50, 700, 1 and 2000 tokens, then the rest."""
    row1, used = [], 0
    for n in (1, 50, 700, 1, 2000):
        row1.extend(range(n))
        used += n
    row1.extend(range(T - used))
    return torch.stack([torch.arange(T), torch.tensor(row1)]).cuda()


def inputs(dtype: torch.dtype, seed: int = 0, strided: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    proj = torch.randn(B, H, T, D + 2, device="cuda", generator=g)
    proj[..., D] *= 3.0
    kt, lg = proj[..., :D], proj[..., D]  # strided views, as in the memories layer
    ld = torch.rand(B, H, T, device="cuda", generator=g) * 2.0
    if not strided:
        kt, lg = kt.contiguous(), lg.contiguous()
    return [x.to(dtype) for x in (kt, lg, ld)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(backend: str, leaves, reset, up, **kw):
    leaves = [x.detach().requires_grad_() for x in leaves]
    keys, _ = gated_key_scan(*leaves, reset, backend=backend, **kw)
    grads = torch.autograd.grad((keys.float() * up).sum(), leaves)
    return keys.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_scan_cuda(dtype):
    reset = doc_pos_cuda() == 0
    leaves = inputs(dtype, strided=True)
    up = torch.randn(B, H, T, D, device="cuda")
    out, grads = run("triton", leaves, reset, up)
    ref, ref_grads = run("torch", leaves, reset, up)
    tol_out, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol_out)
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert rel_err(a, b) < tol_grad


def test_triton_matches_fp64_recurrence_cuda():
    dp = doc_pos_cuda()
    leaves = [x[:, :4] for x in inputs(torch.float32, seed=1)]
    up = torch.randn(B, 4, T, D, device="cuda")
    out, grads = run("triton", leaves, dp == 0, up)
    ref_in = [x.double().requires_grad_() for x in leaves]
    ref = gated_keys_naive(*ref_in, dp)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), ref_in)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a, b) < 1e-4


def test_triton_state_carry_cuda():
    """[0, T) == [0, 1000) + [1000, 3001) + [3001, T) with the state carried (bf16 in)."""
    reset = doc_pos_cuda() == 0
    leaves = [x.detach().requires_grad_() for x in inputs(torch.bfloat16, seed=2)]
    up = torch.randn(B, H, T, D, device="cuda")
    full, _ = gated_key_scan(*leaves, reset, backend="triton")
    g_full = torch.autograd.grad((full.float() * up).sum(), leaves)
    parts, state = [], None
    for lo, hi in ((0, 1000), (1000, 3001), (3001, T)):
        k, state = gated_key_scan(
            *(x[:, :, lo:hi] for x in leaves), reset[:, lo:hi], state, True, backend="triton"
        )
        parts.append(k)
    parts = torch.cat(parts, dim=2)
    g_parts = torch.autograd.grad((parts.float() * up).sum(), leaves)
    torch.testing.assert_close(parts.float(), full.float(), rtol=0, atol=1e-2)
    for a, b in zip(g_parts, g_full, strict=True):
        assert rel_err(a, b) < 1e-2
