"""Memory read backends (Eq. 4 with the masks of Eq. 10) against the dense reference."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from mm_megatron.ops import (
    MEMORY_BACKENDS,
    memory_attention,
    memory_attention_dense,
    memory_mask,
    visible_pairs,
)

# the package exports the function under the submodule's name; fetch the module itself
ma_module = importlib.import_module("mm_megatron.ops.memory_attention")

flex_only = pytest.mark.skipif(not ma_module.HAS_FLEX, reason="FlexAttention not importable")

H_STM, M_LTM = 8, 3
MEMORIES = {"stm": (1, H_STM - 1), "ltm": (M_LTM, None)}


def doc_pos_rows(T: int) -> torch.Tensor:
    """Two layouts: one document; documents of length 1, 2, 1, 4, ... then a long one."""
    row0 = torch.arange(T)
    lengths, row1 = [1, 2, 1, 4, 1, 3], []
    for n in lengths:
        row1.extend(range(n))
    row1.extend(range(max(T - len(row1), 0)))
    return torch.stack([row0, torch.tensor(row1[:T])])


def qkv(T, dtype, D=8, H=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, T, D, generator=g) * 3.0  # β-scaled queries
    k = torch.nn.functional.normalize(torch.randn(2, H, T, D, generator=g), dim=-1)
    v = torch.randn(2, H, T, D, generator=g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def run(backend, q, k, v, dp, lags, upstream):
    out = memory_attention(q, k, v, dp, *lags, backend=backend)
    grads = torch.autograd.grad((out.float() * upstream).sum(), (q, k, v))
    return out.detach(), grads


TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),  # flex eager runs bf16 on CPU, backward too
}


@flex_only
@pytest.mark.parametrize(
    "T,memory,dtype",
    list(itertools.product([1, 2, 5, 37], ["stm", "ltm"], [torch.float32, torch.float64]))
    + [(37, "stm", torch.bfloat16), (37, "ltm", torch.bfloat16)],
)
def test_flex_matches_dense(T, memory, dtype):
    lags = MEMORIES[memory]
    q, k, v = qkv(T, dtype)
    dp = doc_pos_rows(T)
    up = torch.randn(q.shape)
    ref, ref_g = run("dense", q, k, v, dp, lags, up)
    out, out_g = run("flex", q, k, v, dp, lags, up)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for a, b in zip(out_g, ref_g, strict=True):
        assert torch.isfinite(a).all()
        if dtype == torch.bfloat16:  # gradients reach ~20: compare in relative norm
            assert ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2
        else:
            torch.testing.assert_close(a, b, **TOL[dtype])
    empty = visible_pairs(dp, *lags) == 0  # [B, T]
    assert empty[:, 0].all()  # the first token of a document has an empty memory
    assert (out.permute(0, 2, 1, 3)[empty] == 0).all()
    assert (ref.permute(0, 2, 1, 3)[empty] == 0).all()


@pytest.mark.parametrize("backend", ["dense", pytest.param("flex", marks=flex_only)])
@pytest.mark.parametrize("memory", ["stm", "ltm"])
def test_causality(backend, memory):
    T, t = 23, 11
    lags = MEMORIES[memory]
    q, k, v = (x.detach() for x in qkv(T, torch.float64, seed=1))
    dp = doc_pos_rows(T)
    base = memory_attention(q, k, v, dp, *lags, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[..., t + 1 :, :] = torch.randn_like(k2[..., t + 1 :, :])
    v2[..., t + 1 :, :] += 10.0
    out = memory_attention(q, k2, v2, dp, *lags, backend=backend)
    torch.testing.assert_close(out[..., : t + 1, :], base[..., : t + 1, :], rtol=0, atol=0)
    assert not torch.allclose(out[..., t + 1 :, :], base[..., t + 1 :, :])


@pytest.mark.parametrize("lags", [(1, 7), (3, None), (0, 0), (2, 5), (1, None)])
def test_visible_pairs_match_mask(lags):
    dp = doc_pos_rows(29)
    assert torch.equal(visible_pairs(dp, *lags), memory_mask(dp, *lags).sum(-1))


def test_dense_backend_is_the_reference():
    q, k, v = (x.detach() for x in qkv(9, torch.float32))
    dp = doc_pos_rows(9)
    out = memory_attention(q, k, v, dp, 1, 7, backend="dense")
    assert torch.equal(out, memory_attention_dense(q, k, v, dp, 1, 7))
    # "auto" is dense on CPU
    assert torch.equal(memory_attention(q, k, v, dp, 1, 7), out)


@flex_only
def test_memory_masks_build_each_span_once():
    dp = doc_pos_rows(16)
    masks = ma_module.MemoryMasks(dp)
    bm1 = masks.block_mask(1, 7)
    assert masks.block_mask(1, 7) is bm1
    assert masks.block_mask(3, None) is not bm1
    assert len(masks) == 2
    masks.check_layout(dp.detach())  # a recomputed layer gets a detached view: accepted
    with pytest.raises(ValueError, match="another doc_pos"):
        masks.check_layout(dp.clone())
    q, k, v = (x.detach() for x in qkv(16, torch.float64))
    with pytest.raises(ValueError, match="another doc_pos"):
        memory_attention(q, k, v, dp.clone(), 1, 7, backend="flex", masks=masks)
    torch.testing.assert_close(
        memory_attention(q, k, v, dp, 1, 7, backend="flex", masks=masks),
        memory_attention_dense(q, k, v, dp, 1, 7),
    )
    assert len(masks) == 2
    with pytest.raises(ValueError, match="integer doc positions"):
        ma_module.MemoryMasks(dp.float())
    with pytest.raises(ValueError, match="masks must be"):
        memory_attention(q, k, v, dp, 1, 7, backend="flex", masks=object())


@pytest.fixture
def compiled_on_cpu():
    """Compile the flex read and mask builder on CPU (aot_eager) and raise on a recompile-limit
    hit; restore the defaults afterwards."""
    import torch._dynamo

    counts = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        counts.append("flex_attention" in gm.code)
        return lookup_backend("aot_eager")(gm, example_inputs)

    old = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    ma_module.configure_flex_compile(backend, on_cpu=True)
    yield counts
    ma_module.configure_flex_compile()
    torch._dynamo.config.fail_on_recompile_limit_hit = old


@flex_only
@pytest.mark.parametrize("compiled", [False, True])
def test_flex_matches_dense_for_many_offsets(compiled, request):
    """Flex equals dense (outputs and gradients) for several m and the STM in one process;
    compiled, the read compiles once (with grad) and the mask builder once, for all of them."""
    counts = request.getfixturevalue("compiled_on_cpu") if compiled else None
    T = 41
    dp = doc_pos_rows(T)
    q, k, v = qkv(T, torch.float64, seed=4)
    up = torch.randn(q.shape, dtype=torch.float64)
    spans = [(1, H_STM - 1)] + [(m, None) for m in (2, 3, 5, 8, 13, 21, 34)]
    for lags in spans:
        masks = ma_module.new_memory_masks(dp)
        out = memory_attention(q, k, v, dp, *lags, backend="flex", masks=masks)
        grads = torch.autograd.grad((out * up).sum(), (q, k, v))
        ref = memory_attention(q, k, v, dp, *lags, backend="dense")
        ref_g = torch.autograd.grad((ref * up).sum(), (q, k, v))
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
        for a, b in zip(grads, ref_g, strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    if compiled:
        assert sorted(counts) == [False, True], counts  # one mask builder, one flex read


def test_configure_flex_compile_validates():
    with pytest.raises(ValueError, match="backend"):
        ma_module.configure_flex_compile("")
    with pytest.raises(ValueError, match="on_cpu"):
        ma_module.configure_flex_compile("aot_eager", on_cpu="yes")


def test_bad_backend_names_the_options():
    q, k, v = (x.detach() for x in qkv(4, torch.float32))
    dp = doc_pos_rows(4)
    with pytest.raises(ValueError) as err:
        memory_attention(q, k, v, dp, 1, 7, backend="flash")
    for name in MEMORY_BACKENDS:
        assert repr(name) in str(err.value) or name in str(err.value)
    assert MEMORY_BACKENDS == ("auto", "dense", "flex")


def test_shape_errors():
    q, k, v = (x.detach() for x in qkv(4, torch.float32))
    dp = doc_pos_rows(4)
    with pytest.raises(ValueError, match="doc_pos"):
        memory_attention(q, k, v, dp[:, :3], 1, 7)
    with pytest.raises(ValueError, match="q and k"):
        memory_attention(q, k[..., :2, :], v, dp, 1, 7)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        memory_attention(q[0], k, v, dp, 1, 7)
    with pytest.raises(ValueError, match="max_lag"):
        memory_attention(q, k, v, dp, 3, 2)
