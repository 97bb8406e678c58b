"""Chunked gated key scan (Eq. 8) against the literal recurrence of the reference."""

from __future__ import annotations

import pytest
import torch

from mm_megatron.ops import gated_keys_chunked, gated_keys_naive


def doc_pos_from_starts(T: int, starts: set[int]) -> torch.Tensor:
    """``[T]`` position-in-document for documents starting at ``starts`` (0 always starts)."""
    out, p = [], 0
    for t in range(T):
        if t == 0 or t in starts:
            p = 0
        out.append(p)
        p += 1
    return torch.tensor(out, dtype=torch.long)


# Different layouts per batch row: one long document; many documents including length-1 ones.
LAYOUTS = ({0}, {1, 2, 3, 9, 10, 40, 64, 65, 66, 100, 129, 130, 131, 199})


def make_inputs(B, H, T, D, dtype, seed=0, gate_scale=2.0, decay_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    kt = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    lg = torch.randn(B, H, T, generator=g, dtype=torch.float64) * gate_scale
    ld = torch.rand(B, H, T, generator=g, dtype=torch.float64) * decay_scale
    dp = torch.stack([doc_pos_from_starts(T, LAYOUTS[b % len(LAYOUTS)]) for b in range(B)])
    return kt.to(dtype), lg.to(dtype), ld.to(dtype), dp


def outputs_and_grads(fn, kt, lg, ld, dp, upstream, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (kt, lg, ld)]
    out = fn(*leaves, dp, **kw)
    grads = torch.autograd.grad((out.float() * upstream).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 63, 65, 200])
def test_chunked_matches_naive_fp64(T, chunk):
    kt, lg, ld, dp = make_inputs(2, 3, T, 5, torch.float64)
    up = torch.randn(2, 3, T, 5, dtype=torch.float64)
    ref, ref_g = outputs_and_grads(gated_keys_naive, kt, lg, ld, dp, up)
    out, out_g = outputs_and_grads(gated_keys_chunked, kt, lg, ld, dp, up, chunk_size=chunk)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for name, a, b in zip(("k_tilde", "log_gate", "log_decay"), out_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("T,chunk", [(7, 16), (65, 16), (200, 64), (1000, 16)])
def test_chunked_matches_naive_fp32(T, chunk):
    # T=1000 with C=16 exercises two levels of chunk recursion (1000 -> 63 -> 4 chunks).
    kt, lg, ld, dp = make_inputs(2, 2, T, 8, torch.float32, seed=1)
    up = torch.randn(2, 2, T, 8)
    ref, ref_g = outputs_and_grads(
        gated_keys_naive, kt.double(), lg.double(), ld.double(), dp, up.double()
    )
    out, out_g = outputs_and_grads(gated_keys_chunked, kt, lg, ld, dp, up, chunk_size=chunk)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for a, b in zip(out_g, ref_g, strict=True):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=0, atol=1e-5)


def test_chunked_bf16_inputs():
    kt, lg, ld, dp = make_inputs(2, 2, 130, 16, torch.bfloat16, seed=2)
    up = torch.randn(2, 2, 130, 16)
    ref, ref_g = outputs_and_grads(gated_keys_naive, kt, lg, ld, dp, up)
    out, out_g = outputs_and_grads(gated_keys_chunked, kt, lg, ld, dp, up, chunk_size=16)
    assert out.dtype == torch.bfloat16
    # both compute in fp32 from the same bf16 inputs; the gap is the final bf16 rounding
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=1e-2)
    for a, b in zip(out_g, ref_g, strict=True):
        assert a.dtype == torch.bfloat16
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < 2e-2


def test_long_sequence_stability():
    """T=4096, Σ log_decay ~ 1e4 with spikes, log_gate in ±30: fp32 chunked vs fp64 naive."""
    B, H, T, D = 1, 2, 4096, 16
    g = torch.Generator().manual_seed(3)
    kt = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    lg = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 60 - 30
    ld = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 5
    ld[..., ::97] += 100.0
    dp = doc_pos_from_starts(T, {1000, 1001, 3000}).unsqueeze(0)
    assert ld.sum(-1).min() > 1e4
    ref = gated_keys_naive(kt, lg, ld, dp)
    for chunk in (16, 64):
        leaves = [x.float().requires_grad_() for x in (kt, lg, ld)]
        out = gated_keys_chunked(*leaves, dp, chunk_size=chunk)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-5)
        out.square().mul(torch.randn_like(out)).sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in leaves)
        torch.testing.assert_close(
            gated_keys_chunked(kt, lg, ld, dp, chunk_size=chunk), ref, rtol=0, atol=1e-10
        )


def test_tiny_norm_uses_the_reference_eps():
    """With g = e^-30 everywhere ‖k̄‖ < eps: the result must follow l2_normalize's floor."""
    kt, _, ld, dp = make_inputs(1, 2, 300, 8, torch.float64, seed=4)
    lg = torch.full(ld.shape, -30.0, dtype=torch.float64)
    ref = gated_keys_naive(kt, lg, ld, dp)
    assert ref.norm(dim=-1).max() < 1e-3  # the floor is active
    torch.testing.assert_close(gated_keys_chunked(kt, lg, ld, dp, 16), ref, rtol=1e-9, atol=0)


def test_document_isolation():
    """Keys of a document do not change when a neighbouring document's inputs change."""
    T = 150
    kt, lg, ld, _ = make_inputs(1, 2, T, 4, torch.float64, seed=5)
    dp = doc_pos_from_starts(T, {40, 41, 97}).unsqueeze(0)  # docs [0,40) [40] [41,97) [97,150)
    base = gated_keys_chunked(kt, lg, ld, dp, chunk_size=16)
    for lo, hi in ((0, 40), (40, 41), (41, 97), (97, 150)):
        kt2, lg2, ld2 = kt.clone(), lg.clone(), ld.clone()
        kt2[..., lo:hi, :] += 3.0
        lg2[..., lo:hi] -= 5.0
        ld2[..., lo:hi] += 1.0
        out = gated_keys_chunked(kt2, lg2, ld2, dp, chunk_size=16)
        outside = torch.ones(T, dtype=torch.bool)
        outside[lo:hi] = False
        # equal up to fp64 rounding: log-decays of an earlier document in the same chunk
        # enter the chunk-local prefix sums, where they cancel exactly only in exact arithmetic
        torch.testing.assert_close(out[..., outside, :], base[..., outside, :], rtol=0, atol=1e-12)
        assert not torch.allclose(out[..., lo:hi, :], base[..., lo:hi, :])


def test_shape_errors():
    kt, lg, ld, dp = make_inputs(1, 2, 10, 4, torch.float32)
    with pytest.raises(ValueError, match="log_gate"):
        gated_keys_chunked(kt, lg[:, :1], ld, dp)
    with pytest.raises(ValueError, match="doc_pos"):
        gated_keys_chunked(kt, lg, ld, dp.float())
    with pytest.raises(ValueError, match="chunk_size"):
        gated_keys_chunked(kt, lg, ld, dp, chunk_size=1)
