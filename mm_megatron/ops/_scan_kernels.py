"""Triton kernels of the fused gated key scan (Eq. 8); loaded by :mod:`.triton_scan` only.

Eq. 8: k̄_t = g_t k̃_t + λ_t k̄_{t-1}, g_t = exp(G_t), λ_t = exp(−ℓ_t), k̄ reset to 0 at a
document's first token, k_t = k̄_t / max(‖k̄_t‖, eps).

One program per (batch, head) walks T in tiles of ``BT`` tokens with the whole head vector
(``BD`` ≥ D lanes), so the norm is fused. The state k̄ = exp(c) · S lives in fp32 registers:
c is the running maximum of the log weights (a scalar per token), S the rescaled vector, every
weight inside S at most 1, so exp(G) never overflows and long products of decays never
underflow to a wrong value. Inside a tile:

1. a scalar associative scan over (ℓ, G) gives c_t = max(c_{t-1} − ℓ_t, G_t) (ℓ = +inf at a
   reset), started from the carried c;
2. the vector recurrence becomes S_t = a_t S_{t-1} + b_t with a_t = exp(c_{t-1} − ℓ_t − c_t)
   ∈ [0, 1] (0 at a reset) and b_t = exp(G_t − c_t) k̃_t, solved by a second associative scan
   (the carried S enters through b of the tile's first row);
3. the tile's last row is the carry into the next tile.

The backward kernel runs the tiles in reverse. It recomputes each tile's states from the carry
stored at the tile's start (a checkpoint every ``BT`` tokens: fp32 (1 + D) numbers per tile and
head, i.e. 4·(1 + D)/BT bytes per token against 2·D for a bf16 k̃; storing every state instead
would cost 4·D bytes per token, twice the bf16 input, written and read back once each), then
solves the adjoint recurrence δ_t = ∂L/∂k̄_t + λ_{t+1} δ_{t+1} (no carry across a reset) with
the same two scans, reversed, again as δ = exp(d) · Δ with a running maximum d.

Gradients (all from δ and the recomputed states, in fp32):
    ∂k̃_t = g_t δ_t,  ∂G_t = g_t k̃_t · δ_t,  ∂ℓ_t = −(k̄_t − g_t k̃_t) · δ_t  (0 at a reset),
and ∂L/∂k̄ of the norm: (dk − k (k·dk)) / ‖k̄‖ above the eps floor, dk / eps below it.
"""

# ruff: noqa: ANN001, ANN201
# (Triton kernel arguments are pointers, strides and constexprs typed by the JIT.)

import triton
import triton.language as tl

_INF = tl.constexpr(float("inf"))
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _log_combine(l1, c1, l2, c2):
    """Compose (ℓ, c) pairs: element 1 comes first in scan order, element 2 decays it."""
    return l1 + l2, tl.maximum(c1 - l2, c2)


@triton.jit
def _lin_combine(a1, b1, a2, b2):
    """Compose affine maps S -> a S + b: element 1 first in scan order, then element 2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _shift(v, fill, BT: tl.constexpr, UP: tl.constexpr):
    """``[BT]`` vector shifted by one row (UP: out[i] = v[i+1]), ``fill`` at the open end."""
    i = tl.arange(0, BT)
    if UP:
        src = i + 1
        edge = BT - 1
    else:
        src = i - 1
        edge = 0
    picked = tl.max(tl.where(i[None, :] == src[:, None], v[None, :], _NEG_INF), axis=1)
    return tl.where(i == edge, fill, picked)


@triton.jit
def _tile_states(x, G, ell, rs, c_in, s_in, BT: tl.constexpr, BD: tl.constexpr):
    """States (c_t, S_t) of one tile from the carry (c_in, s_in); padded rows (G = −inf,
    ℓ = 0) pass the state through unchanged, so the last row is always the carry out."""
    rows = tl.arange(0, BT)
    ell_e = tl.where(rs, _INF, ell)
    lsum, cscan = tl.associative_scan((ell_e, G), 0, _log_combine)
    c = tl.maximum(c_in - lsum, cscan)
    cprev = _shift(c, c_in, BT, False)
    a = tl.where(rs | (cprev == _NEG_INF), 0.0, tl.exp(tl.minimum(cprev - ell - c, 0.0)))
    bw = tl.where(G == _NEG_INF, 0.0, tl.exp(G - c))
    b = x * bw[:, None] + tl.where(rows == 0, a, 0.0)[:, None] * s_in[None, :]
    _, S = tl.associative_scan((tl.broadcast_to(a[:, None], (BT, BD)), b), 0, _lin_combine)
    return c, cprev, bw, S


@triton.jit
def scan_fwd_kernel(
    x_ptr,
    g_ptr,
    l_ptr,
    r_ptr,
    c0_ptr,
    s0_ptr,
    out_ptr,
    cT_ptr,
    sT_ptr,
    ckc_ptr,
    cks_ptr,
    H,
    T,
    D,
    NT,
    sxb,
    sxh,
    sxt,
    sxd,
    sgb,
    sgh,
    sgt,
    slb,
    slh,
    slt,
    srb,
    srt,
    log_eps,
    STORE_CKPT: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """Forward scan of Eq. 8 for one (batch, head): normalised keys, final state, checkpoints."""
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: strided views span > 2^31
    b = pid // H
    h = pid % H
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    cmask = cols < D
    x_base = x_ptr + b * sxb + h * sxh
    g_base = g_ptr + b * sgb + h * sgh
    l_base = l_ptr + b * slb + h * slh
    r_base = r_ptr + b * srb
    c_in = tl.load(c0_ptr + pid)
    s_in = tl.load(s0_ptr + pid * D + cols, mask=cmask, other=0.0)
    for j in range(0, NT):
        t = (j * BT + rows).to(tl.int64)
        tm = t < T
        if STORE_CKPT:
            tl.store(ckc_ptr + pid * NT + j, c_in)
            tl.store(cks_ptr + (pid * NT + j) * D + cols, s_in, mask=cmask)
        G = tl.load(g_base + t * sgt, mask=tm, other=_NEG_INF).to(tl.float32)
        ell = tl.load(l_base + t * slt, mask=tm, other=0.0).to(tl.float32)
        rs = tl.load(r_base + t * srt, mask=tm, other=0) != 0
        m2 = tm[:, None] & cmask[None, :]
        x = tl.load(x_base + t[:, None] * sxt + cols[None, :] * sxd, mask=m2, other=0.0)
        c, cprev, bw, S = _tile_states(x.to(tl.float32), G, ell, rs, c_in, s_in, BT, BD)
        norm = tl.sqrt(tl.sum(S * S, axis=1))
        big = (c + tl.log(norm)) >= log_eps
        scale = tl.where(big, 1.0 / tl.where(big, norm, 1.0), tl.exp(tl.minimum(c - log_eps, 80.0)))
        out = S * scale[:, None]
        o_ptrs = out_ptr + (pid * T + t[:, None]) * D + cols[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m2)
        last = rows == BT - 1
        c_in = tl.max(tl.where(last, c, _NEG_INF), axis=0)
        s_in = tl.sum(tl.where(last[:, None], S, 0.0), axis=0)
    tl.store(cT_ptr + pid, c_in)
    tl.store(sT_ptr + pid * D + cols, s_in, mask=cmask)


@triton.jit
def scan_bwd_kernel(
    x_ptr,
    g_ptr,
    l_ptr,
    r_ptr,
    dk_ptr,
    ckc_ptr,
    cks_ptr,
    cT_ptr,
    dsT_ptr,
    dx_ptr,
    dg_ptr,
    dl_ptr,
    d0_ptr,
    dd0_ptr,
    H,
    T,
    D,
    NT,
    sxb,
    sxh,
    sxt,
    sxd,
    sgb,
    sgh,
    sgt,
    slb,
    slh,
    slt,
    srb,
    srt,
    skb,
    skh,
    skt,
    skd,
    log_eps,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """Reverse scan of Eq. 8 for one (batch, head): gradients of k̃, G, ℓ and δ at t = 0.

    The adjoint enters from the final state's gradient: δ_{T-1} gets exp(−c_T) · ∂L/∂S_T.
    """
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: strided views span > 2^31
    b = pid // H
    h = pid % H
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    cmask = cols < D
    x_base = x_ptr + b * sxb + h * sxh
    g_base = g_ptr + b * sgb + h * sgh
    l_base = l_ptr + b * slb + h * slh
    r_base = r_ptr + b * srb
    k_base = dk_ptr + b * skb + h * skh
    d_in = -tl.load(cT_ptr + pid)
    dl_in = tl.load(dsT_ptr + pid * D + cols, mask=cmask, other=0.0)
    for jj in range(0, NT):
        j = NT - 1 - jj
        t = (j * BT + rows).to(tl.int64)
        tm = t < T
        tn = t + 1
        tnm = tn < T
        m2 = tm[:, None] & cmask[None, :]
        G = tl.load(g_base + t * sgt, mask=tm, other=_NEG_INF).to(tl.float32)
        ell = tl.load(l_base + t * slt, mask=tm, other=0.0).to(tl.float32)
        rs = tl.load(r_base + t * srt, mask=tm, other=0) != 0
        elln = tl.load(l_base + tn * slt, mask=tnm, other=0.0).to(tl.float32)
        rn = tl.load(r_base + tn * srt, mask=tnm, other=0) != 0
        x = tl.load(x_base + t[:, None] * sxt + cols[None, :] * sxd, mask=m2, other=0.0)
        x = x.to(tl.float32)
        dk = tl.load(k_base + t[:, None] * skt + cols[None, :] * skd, mask=m2, other=0.0)
        dk = dk.to(tl.float32)
        c_in = tl.load(ckc_ptr + pid * NT + j)
        s_in = tl.load(cks_ptr + (pid * NT + j) * D + cols, mask=cmask, other=0.0)
        c, cprev, bw, S = _tile_states(x, G, ell, rs, c_in, s_in, BT, BD)
        # ∂L/∂k̄_t = exp(e_t) · U_t through the norm
        norm = tl.sqrt(tl.sum(S * S, axis=1))
        big = (c + tl.log(norm)) >= log_eps
        inv = 1.0 / tl.where(big, norm, 1.0)
        k = S * inv[:, None]
        kdk = tl.sum(k * dk, axis=1)
        U = tl.where(big[:, None], (dk - k * kdk[:, None]) * inv[:, None], dk)
        U = tl.where(tm[:, None], U, 0.0)
        e = tl.where(tm, tl.where(big, -c, -log_eps), _NEG_INF)
        # adjoint δ_t = exp(d_t) · Δ_t, scanned from the end of the tile
        elln_e = tl.where(rn, _INF, elln)
        lsum, dscan = tl.associative_scan((elln_e, e), 0, _log_combine, reverse=True)
        d = tl.maximum(d_in - lsum, dscan)
        dnext = _shift(d, d_in, BT, True)
        a2 = tl.where(rn | (dnext == _NEG_INF), 0.0, tl.exp(tl.minimum(dnext - elln - d, 0.0)))
        bw2 = tl.where(e == _NEG_INF, 0.0, tl.exp(e - d))
        b2 = U * bw2[:, None] + tl.where(rows == BT - 1, a2, 0.0)[:, None] * dl_in[None, :]
        _, Dl = tl.associative_scan(
            (tl.broadcast_to(a2[:, None], (BT, BD)), b2), 0, _lin_combine, reverse=True
        )
        wx = tl.where(d == _NEG_INF, 0.0, tl.exp(G + d))
        dx = Dl * wx[:, None]
        dG = wx * tl.sum(x * Dl, axis=1)
        has_prev = (~rs) & (cprev != _NEG_INF) & (d != _NEG_INF)
        wl = tl.where(has_prev, tl.exp(c + d), 0.0)
        dL = -wl * tl.sum((S - x * bw[:, None]) * Dl, axis=1)
        tl.store(
            dx_ptr + (pid * T + t[:, None]) * D + cols[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=m2,
        )
        tl.store(dg_ptr + pid * T + t, dG.to(dg_ptr.dtype.element_ty), mask=tm)
        tl.store(dl_ptr + pid * T + t, dL.to(dl_ptr.dtype.element_ty), mask=tm)
        first = rows == 0
        d_in = tl.max(tl.where(first, d, _NEG_INF), axis=0)
        dl_in = tl.sum(tl.where(first[:, None], Dl, 0.0), axis=0)
    tl.store(d0_ptr + pid, d_in)
    tl.store(dd0_ptr + pid * D + cols, dl_in, mask=cmask)
