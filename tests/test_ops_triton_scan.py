"""Fused Triton key scan (Eq. 8) against the literal recurrence, and the shared state contract.

The Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1: for the session on
a machine without CUDA, see conftest.py, and per test), so
shapes are tiny: the interpreter executes every scan step in Python. Without the triton
package those tests skip; the torch backend's state tests and the dispatch/config tests run
everywhere. CUDA checks at realistic shapes are in tests/gpu/test_ops_triton_scan_gpu.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from mm_megatron.config import ModelConfig
from mm_megatron.config_loading import ConfigError, from_mapping
from mm_megatron.ops import gated_key_scan, gated_keys_naive
from mm_megatron.ops.gated_scan import doc_pos_from_reset
from mm_megatron.ops.key_scan import resolve_scan_backend
from mm_megatron.ops.triton_scan import HAS_TRITON

needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not importable (CI installs it from requirements.lock)"
)
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Triton's CPU interpreter for this test only (never leaks into other tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def resets(T: int, starts: set[int]) -> torch.Tensor:
    r = torch.zeros(T, dtype=torch.bool)
    r[[s for s in {0, *starts} if s < T]] = True
    return r


# row 0: one document; row 1: many documents, several of length 1 (3, 4, 9, 64)
LAYOUTS = (set(), {3, 4, 5, 9, 10, 16, 17, 40, 64, 65})


def make_inputs(B, H, T, D, seed=0, gate_scale=2.0, decay_scale=1.0):
    """fp64 inputs; k_tilde and log_gate are strided views, as in the memories layer."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, H, T, D + 3, generator=g, dtype=torch.float64)
    kt = proj[..., 1 : D + 1]
    proj[..., 0] *= gate_scale
    lg = proj[..., 0]
    ld = torch.rand(B, H, T, generator=g, dtype=torch.float64) * decay_scale
    rs = torch.stack([resets(T, LAYOUTS[b % len(LAYOUTS)]) for b in range(B)])
    return kt, lg, ld, rs


def naive_keys(kt, lg, ld, rs):
    return gated_keys_naive(kt, lg, ld, doc_pos_from_reset(rs))


def keys_and_grads(fn, inputs, rs, up):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves, rs)
    grads = torch.autograd.grad((out.double() * up).sum(), leaves)
    return out.detach(), grads


def scan(backend, **kw):
    return lambda kt, lg, ld, rs: gated_key_scan(kt, lg, ld, rs, backend=backend, **kw)[0]


def max_scaled_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def assert_matches(out, grads, ref, ref_grads, out_tol, grad_tol):
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out.double() - ref.double()).abs().max().item() <= out_tol
    for name, a, b in zip(("k_tilde", "log_gate", "log_decay"), grads, ref_grads, strict=True):
        assert a.shape == b.shape
        err = max_scaled_err(a, b)
        assert err <= grad_tol, f"grad {name}: {err:.3g}"


@needs_triton
@pytest.mark.parametrize("T", [1, 3, 17, 65])
def test_triton_matches_naive_fp32(T):
    kt, lg, ld, rs = make_inputs(2, 1, T, 4, seed=T)
    up = torch.randn(2, 1, T, 4, dtype=torch.float64)
    ref, ref_g = keys_and_grads(naive_keys, (kt, lg, ld), rs, up)
    f32 = [x.float() for x in (kt, lg, ld)]
    ref32, ref32_g = keys_and_grads(naive_keys, f32, rs, up)
    out, grads = keys_and_grads(scan("triton", block_t=16), f32, rs, up)
    assert out.dtype == torch.float32
    assert_matches(out, grads, ref, ref_g, 2e-6, 1e-5)  # against the fp64 recurrence
    assert_matches(out, grads, ref32, ref32_g, 2e-6, 1e-5)  # against the fp32 recurrence


@needs_triton
def test_triton_bf16_in_and_out():
    kt, lg, ld, rs = make_inputs(2, 1, 33, 8, seed=7)
    up = torch.randn(2, 1, 33, 8, dtype=torch.float64)
    bf = [x.to(torch.bfloat16) for x in (kt, lg, ld)]
    # the recurrence on the same bf16 inputs (it computes in fp32): the gap is bf16 rounding
    ref, ref_g = keys_and_grads(naive_keys, bf, rs, up)
    out, grads = keys_and_grads(scan("triton", block_t=16), bf, rs, up)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_matches(out, grads, ref, ref_g, 2e-2, 2e-2)


@needs_triton
def test_triton_extreme_gates():
    """W_g x = ±60, decays ~0 and ~1e4, resets and the eps floor (‖k̄‖ ~ e^-60 < eps)."""
    T = 40
    kt, _, _, rs = make_inputs(2, 2, T, 4, seed=11)
    lg = torch.full((2, 2, T), 60.0, dtype=torch.float64)
    lg[:, 1, : T // 2] = -60.0  # head 1: floored keys, then huge gates
    lg[:, 0, 1::3] = -60.0  # head 0: alternating ±60
    ld = torch.full((2, 2, T), 1e-8, dtype=torch.float64)
    ld[..., 5::7] = 1e4
    ld[:, 1, 20:] = 0.0
    up = torch.randn(2, 2, T, 4, dtype=torch.float64)
    ref, ref_g = keys_and_grads(naive_keys, (kt, lg, ld), rs, up)
    assert (ref[:, 1, : T // 2].norm(dim=-1) < 1e-3).any()  # the eps floor is exercised
    out, grads = keys_and_grads(
        scan("triton", block_t=16), [x.float() for x in (kt, lg, ld)], rs, up
    )  # noqa: E501
    assert_matches(out, grads, ref, ref_g, 2e-6, 1e-5)


def split_scan(backend, kt, lg, ld, rs, cuts, **kw):
    """Scan [0, T) in pieces at ``cuts``, carrying the state; returns keys and final state."""
    keys, state, bounds = [], None, [0, *cuts, kt.shape[2]]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        k, state = gated_key_scan(
            kt[:, :, lo:hi],
            lg[:, :, lo:hi],
            ld[:, :, lo:hi],
            rs[:, lo:hi],
            state,
            True,
            backend=backend,
            **kw,
        )
        keys.append(k)
    return torch.cat(keys, dim=2), state


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_carry_equals_one_scan(backend):
    """[0, T) == [0, t) then [t, T) with the state carried: keys, final state and gradients
    (through the carried state) of all inputs; cuts inside, at and after documents."""
    T, kw = 40, ({"block_t": 8} if backend == "triton" else {"chunk_size": 8})
    kt, lg, ld, rs = make_inputs(2, 1, T, 4, seed=3)
    kt, lg, ld = (x.float() for x in (kt, lg, ld))
    rs[1, 17] = True  # a document starts exactly at the cut of row 1
    up = torch.randn(2, 1, T, 4, dtype=torch.float64)
    w = torch.randn(2, 1, 4, dtype=torch.float64)
    leaves = [x.detach().requires_grad_() for x in (kt, lg, ld)]

    def loss(keys, state):  # the final state enters through k̄ = e^c S
        c, s = state
        return (keys.double() * up).sum() + (torch.exp(c.double()).unsqueeze(-1) * s * w).sum()

    full, full_state = gated_key_scan(*leaves, rs, None, True, backend=backend, **kw)
    g_full = torch.autograd.grad(loss(full, full_state), leaves)
    parts, part_state = split_scan(backend, *leaves, rs, [1, 17, 30], **kw)
    g_parts = torch.autograd.grad(loss(parts, part_state), leaves)

    torch.testing.assert_close(parts, full, rtol=0, atol=2e-6)
    torch.testing.assert_close(part_state[0], full_state[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(part_state[1], full_state[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(g_parts, g_full, strict=True):
        assert max_scaled_err(a, b) < 1e-5
    ref = naive_keys(kt.double(), lg.double(), ld.double(), rs)
    torch.testing.assert_close(full.double(), ref, rtol=0, atol=2e-6)


@needs_triton
def test_state_gradients_match_the_torch_backend():
    """Gradients into (c₀, S₀) and out of the final state: Triton vs torch autograd."""
    T = 21
    kt, lg, ld, rs = make_inputs(2, 2, T, 4, seed=5)
    kt, lg, ld = (x.float() for x in (kt, lg, ld))
    rs[:, 0] = False  # both rows continue the carried document ...
    rs[1, 6] = True  # ... row 1 until a reset
    g = torch.Generator().manual_seed(6)
    c0 = torch.randn(2, 2, generator=g) * 3
    s0 = torch.randn(2, 2, 4, generator=g)
    up = torch.randn(2, 2, T, 4, generator=g)
    w = torch.randn(2, 2, 4, generator=g)
    results = {}
    for backend, kw in (("torch", {"chunk_size": 8}), ("triton", {"block_t": 8})):
        leaves = [x.detach().requires_grad_() for x in (kt, lg, ld, c0, s0)]
        keys, (c, s) = gated_key_scan(
            *leaves[:3], rs, (leaves[3], leaves[4]), True, backend=backend, **kw
        )
        loss = (keys * up).sum() + (torch.exp(c).unsqueeze(-1) * s * w).sum()
        results[backend] = (keys.detach(), torch.autograd.grad(loss, leaves))
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=0, atol=2e-6)
    for a, b in zip(results["triton"][1], results["torch"][1], strict=True):
        assert max_scaled_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_token_by_token(backend):
    """Incremental decoding (T = 1 per call, state carried) reproduces the full scan."""
    kt, lg, ld, rs = make_inputs(2, 1, 9, 4, seed=8)
    kt, lg, ld = (x.float() for x in (kt, lg, ld))
    full, _ = gated_key_scan(kt, lg, ld, rs, backend=backend)
    steps, _ = split_scan(backend, kt, lg, ld, rs, list(range(1, 9)))
    torch.testing.assert_close(steps, full, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_drops_the_initial_state(backend):
    kt, lg, ld, rs = make_inputs(1, 2, 5, 4, seed=9)
    kt, lg, ld = (x.float() for x in (kt, lg, ld))
    c0 = torch.zeros(1, 2, requires_grad=True)
    s0 = torch.ones(1, 2, 4, requires_grad=True)
    with_state, _ = gated_key_scan(kt, lg, ld, rs, (c0, s0), backend=backend)
    without, _ = gated_key_scan(kt, lg, ld, rs, backend=backend)
    torch.testing.assert_close(with_state, without, rtol=0, atol=0)
    grads = torch.autograd.grad(with_state.sum(), (c0, s0), allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence_passes_the_state_through(backend):
    kt, lg, ld, rs = make_inputs(1, 2, 0, 4)
    state = (torch.zeros(1, 2), torch.ones(1, 2, 4))
    keys, final = gated_key_scan(
        kt.float(), lg.float(), ld.float(), rs, state, True, backend=backend
    )
    assert keys.shape == (1, 2, 0, 4)
    assert torch.equal(final[0], state[0]) and torch.equal(final[1], state[1])


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_scan_backend("auto", cpu, torch.float32) == "torch"
    assert resolve_scan_backend("torch", cpu, torch.float32) == "torch"
    with pytest.raises(ValueError, match="unknown scan backend"):
        resolve_scan_backend("cuda", cpu, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="scan backend 'triton' requested"):
        resolve_scan_backend("triton", cpu, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_config_rejects_triton_without_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    base = {
        "arch": "mm",
        "num_layers": 1,
        "hidden_size": 8,
        "num_heads": 2,
        "ffn_hidden_size": 8,
        "vocab_size": 16,
        "short_window": 8,
        "ltm_offset_min": 2,
        "ltm_offset_max": 4,
        "ltm_offset_inference": 2,
    }
    with pytest.raises(ConfigError, match=r"model\.scan_backend: 'triton' needs"):
        from_mapping(ModelConfig, {**base, "scan_backend": "triton"}, "model")
    with pytest.raises(ConfigError, match=r"model\.scan_backend"):
        from_mapping(ModelConfig, {**base, "scan_backend": "cuda"}, "model")
    assert from_mapping(ModelConfig, {**base, "scan_backend": "auto"}, "model").scan_backend


@needs_triton
def test_triton_input_errors():
    kt, lg, ld, rs = make_inputs(1, 2, 5, 4)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        gated_key_scan(kt, lg, ld, rs, backend="triton")  # fp64
    with pytest.raises(ValueError, match="reset"):
        gated_key_scan(kt.float(), lg.float(), ld.float(), rs[:, :2], backend="triton")
    with pytest.raises(ValueError, match="initial_state"):
        gated_key_scan(
            kt.float(),
            lg.float(),
            ld.float(),
            rs,
            (torch.zeros(2), torch.zeros(2)),
            backend="triton",
        )
    assert math.isfinite(
        float(gated_key_scan(kt.float(), lg.float(), ld.float(), rs, backend="triton")[0].sum())
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_memories_call_site_uses_the_configured_backend(backend):
    """MMMemories' key scan (doc positions in, unit keys out) under each scan_backend."""
    from types import SimpleNamespace

    from mm_megatron.layers.memories import MMMemories

    kt, lg, ld, rs = make_inputs(2, 1, 19, 4, seed=12)
    kt, lg, ld = (x.float() for x in (kt, lg, ld))
    layer = SimpleNamespace(mm=SimpleNamespace(scan_backend=backend, scan_chunk_size=8))
    keys = MMMemories._key_scan(layer, kt, lg, ld, doc_pos_from_reset(rs))
    ref = naive_keys(kt.double(), lg.double(), ld.double(), rs)
    torch.testing.assert_close(keys.double(), ref, rtol=0, atol=2e-6)
