"""Chunked, log-space parallel form of the gated time-variant key extractor (Eq. 8).

The recurrence of Eq. 8, k̄_T = g_T · k̃_T + λ_T · k̄_{T-1} with g_T = exp(G_T) and
λ_T = exp(-ℓ_T), unrolls to

    k̄_T = Σ_{s ≤ T, same document} exp(G_s − (L_T − L_s)) · k̃_s,   L_T = Σ_{r ≤ T} ℓ_r,

and k_T = Norm(k̄_T). Any positive per-(T, head) factor cancels in Norm, so every sum below is
kept as a pair (c, S) meaning exp(c) · S, with S scaled by a running-max stabiliser. The
algorithm (no loop over T):

1. Cut T into chunks of C tokens. Inside each chunk, with chunk-local prefix sums L^loc and
   a_s = G_s + L^loc_s, form the masked C x C weights exp(a_s − m_t) (s ≤ t, same document,
   m_t the max of the allowed a_s) and the intra-chunk sums by one batched matmul.
2. The state at each chunk's last token, propagated to the next chunk, obeys the same kind of
   gated recurrence over chunks (input gate exp(m − D), decay exp(−D), D the chunk's total
   log-decay, reset where a document starts inside the chunk). It is solved by the same
   routine, recursively, so the sequential depth is log_C(T) levels instead of T steps.
3. Each token combines the carried state (if its document began before the chunk) and its
   intra-chunk sum under a common stabiliser, then is L2-normalised with the exact ``eps``
   semantics of :func:`mm_megatron.ops.naive.l2_normalize` (the true scale is tracked in log
   space, so the eps floor applies to the true ‖k̄_T‖).

Token-level work runs in fp32 (fp64 for fp64 inputs); the small chunk-level recursion forms
its log-space sums in fp64 (fp32 on MPS, which has no fp64), as they span C² tokens.
Stabilisers are detached (they cancel), so autograd through these torch ops gives the
gradients of the literal recurrence. Memory is O(T · C) per (batch, head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mm_megatron.ops.naive import L2_EPS

__all__ = ["ScanState", "doc_pos_from_reset", "gated_key_scan_torch", "gated_keys_chunked"]

# The carried state of Eq. 8 between calls: (c [B, H], S [B, H, D]) meaning k̄ = exp(c) · S.
# c = -inf (with S = 0) is the empty state. fp32 (fp64 for fp64 inputs on the torch path).
ScanState = tuple[torch.Tensor, torch.Tensor]


def _inner_log_dtype(device: torch.device) -> torch.dtype:
    """dtype of the log-space prefix sums: fp64, or fp32 on MPS (no fp64).

    Differences of prefix sums cancel: within a chunk (C tokens) a fp32 sum of |W_λ x| loses
    ~1e-6 of relative accuracy in every weight, which moved fp32 keys by ~2e-6 and made a
    left-padded row differ from the same row alone; the chunk-level recursion spans C chunks
    (C**2 tokens, up to ~1e4 in log units), and so does the decay of a carried state. So all
    of them are formed in fp64; the exponentials and the sums of keys stay in the working
    dtype."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_inputs(
    k_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    doc_pos: torch.Tensor,
    chunk_size: int,
) -> None:
    if k_tilde.dim() != 4:
        raise ValueError(f"k_tilde must be [B, H, T, D], got shape {tuple(k_tilde.shape)}")
    B, H, T, _ = k_tilde.shape
    for name, t in (("log_gate", log_gate), ("log_decay", log_decay)):
        if tuple(t.shape) != (B, H, T):
            raise ValueError(f"{name} must be [B, H, T] = {(B, H, T)}, got {tuple(t.shape)}")
    if tuple(doc_pos.shape) != (B, T):
        raise ValueError(f"doc_pos must be [B, T] = {(B, T)}, got {tuple(doc_pos.shape)}")
    if doc_pos.is_floating_point() or doc_pos.is_complex():
        raise ValueError(f"doc_pos must be an integer tensor, got {doc_pos.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 2:
        raise ValueError(f"chunk_size must be an int >= 2, got {chunk_size!r}")


def _chunked_state(
    kt: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    doc_pos: torch.Tensor,
    chunk_size: int,
    log_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised states of Eq. 8 as (log_scale [B,H,T], state [B,H,T,D]).

    k̄_t = exp(log_scale_t) · state_t, with every weight inside ``state`` at most 1.
    Inputs are already in the working dtype; prefix sums and exponents are formed in
    ``log_dtype`` (exponentials and sums in the working dtype); ``doc_pos`` is ``[B, T]``.
    """
    B, H, T, D = kt.shape
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # padded tokens come last, start their own documents and hold zero keys
        kt = F.pad(kt, (0, 0, 0, pad))
        log_gate = F.pad(log_gate, (0, pad))
        log_decay = F.pad(log_decay, (0, pad))
        doc_pos = F.pad(doc_pos, (0, pad))
    dev = kt.device
    neg_inf = float("-inf")

    k_c = kt.reshape(B, H, N, C, D)
    l_loc = log_decay.to(log_dtype).reshape(B, H, N, C).cumsum(-1)  # L from the chunk start
    a = log_gate.to(log_dtype).reshape(B, H, N, C) + l_loc  # a_s = G_s + L^loc_s
    dp = doc_pos.reshape(B, N, C)
    idx = torch.arange(C, device=dev)
    lag = idx.view(C, 1) - idx.view(1, C)  # t - s
    allowed = ((lag >= 0) & (lag <= dp.unsqueeze(-1))).unsqueeze(1)  # [B, 1, N, C, C]

    a_ts = a.unsqueeze(-2)  # [B, H, N, 1, C], source s on the last axis
    with torch.no_grad():
        m = a_ts.masked_fill(~allowed, neg_inf).amax(-1)  # [B, H, N, C], finite (s = t)
    weights = torch.where(allowed, a_ts - m.unsqueeze(-1), neg_inf).to(kt.dtype).exp()
    s_intra = torch.matmul(weights, k_c)  # [B, H, N, C, D]

    if N == 1:
        c, state = m, s_intra
    else:
        # Chunk-level recurrence: P_{j+1} = e^{-D_j} (P_j + e^{m_end,j} S_end,j), reset when a
        # document starts inside chunk j; same form as Eq. 8, solved recursively.
        d_tot = l_loc[..., -1]  # [B, H, N]
        ends = torch.arange(N, device=dev) * C + (C - 1)
        doc_start_chunk = torch.div(ends - doc_pos[:, ends], C, rounding_mode="floor")
        dp_chunk = (torch.arange(N, device=dev) - doc_start_chunk.clamp_min(0)).to(doc_pos.dtype)
        log_c, s_c = _chunked_state(
            s_intra[..., -1, :],
            m[..., -1] - d_tot,
            d_tot,
            dp_chunk,
            chunk_size,
            _inner_log_dtype(dev),
        )
        # carry into chunk j = state at the end of chunk j - 1
        cp = F.pad(log_c[..., :-1].to(log_dtype), (1, 0), value=neg_inf)  # [B, H, N]
        sp = F.pad(s_c[..., :-1, :], (0, 0, 1, 0))  # [B, H, N, D]
        carry_ok = (dp >= idx + 1).unsqueeze(1)  # document began before the chunk
        cp_t = torch.where(carry_ok, cp.unsqueeze(-1), neg_inf)  # [B, H, N, C]
        with torch.no_grad():
            c = torch.maximum(cp_t, m)
        state = sp.unsqueeze(-2) * (cp_t - c).to(kt.dtype).exp().unsqueeze(-1)
        state = state + s_intra * (m - c).to(kt.dtype).exp().unsqueeze(-1)

    # true k̄_t = exp(c_t - L^loc_t) * state_t: c_t is a detached stabiliser; the frame of
    # chunk j is L relative to its start, and the carry's log-scale tracks the decays D_j.
    log_scale = (c - l_loc).reshape(B, H, N * C)[..., :T]
    return log_scale, state.reshape(B, H, N * C, D)[..., :T, :]


def doc_pos_from_reset(reset: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position within the document from ``reset`` (True at a document's first token).

    Tokens before the first reset count from 0 at t = 0 (they continue the carried document).
    """
    T = reset.shape[-1]
    idx = torch.arange(T, device=reset.device).expand_as(reset)
    last_start = torch.where(reset, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - last_start


def _normalize(log_scale: torch.Tensor, state: torch.Tensor, eps: float) -> torch.Tensor:
    """k = k̄ / max(‖k̄‖, eps) for k̄ = exp(log_scale) · state, without forming k̄.

    ‖k̄‖ < eps  <=>  ‖state‖ < eps · exp(−log_scale). The exponent is capped so that exp stays
    finite (beyond the cap the key is ~0 either way).
    """
    cap = math.log(torch.finfo(state.dtype).max) - 8.0
    floor = (math.log(eps) - log_scale).clamp(max=cap).exp()
    denom = torch.maximum(state.norm(dim=-1), floor)
    return state / denom.unsqueeze(-1)


def gated_key_scan_torch(
    k_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    reset: torch.Tensor,
    initial_state: ScanState | None = None,
    output_final_state: bool = False,
    eps: float = L2_EPS,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, ScanState | None]:
    """Eq. 8 with a carried state, by the chunked torch scan (the CPU path).

    k̄_t = g_t k̃_t + λ_t k̄_{t-1} (k̄_{-1} = exp(c₀) S₀ from ``initial_state``, dropped at a
    reset), k_t = k̄_t / max(‖k̄_t‖, eps). The carried state reaches token t only while no
    document starts in [0, t], with weight exp(c₀ − L_t), L_t = Σ_{r ≤ t} log_decay_r; it is
    merged with the in-segment sum of :func:`_chunked_state` under a common (detached)
    stabiliser. Autograd gives the gradients of all inputs, the state included.

    Args:
        k_tilde: ``[B, H, T, D]``; log_gate, log_decay: ``[B, H, T]``; reset: ``[B, T]`` bool.
        initial_state: ``(c [B, H], S [B, H, D])`` or None (empty state).
        output_final_state: also return the state after the last token.
        eps: the floor of the L2 norm; chunk_size: tokens per chunk (>= 2).
    Returns:
        keys ``[B, H, T, D]`` in ``k_tilde``'s dtype, and ``(c, S)`` in the working dtype
        (fp32, fp64 for fp64 inputs) or None.
    """
    B, H, T, D = k_tilde.shape
    if tuple(reset.shape) != (B, T):
        raise ValueError(f"reset must be [B, T] = {(B, T)}, got {tuple(reset.shape)}")
    reset = reset.bool()
    doc_pos = doc_pos_from_reset(reset)
    _check_inputs(k_tilde, log_gate, log_decay, doc_pos, chunk_size)
    work = torch.float64 if k_tilde.dtype == torch.float64 else torch.float32
    if initial_state is not None:
        c0, s0 = initial_state
        if tuple(c0.shape) != (B, H) or tuple(s0.shape) != (B, H, D):
            raise ValueError(
                f"initial_state must be (c [B, H], S [B, H, D]) = ({(B, H)}, {(B, H, D)}), "
                f"got ({tuple(c0.shape)}, {tuple(s0.shape)})"
            )
    if T == 0:
        final = initial_state
        if output_final_state and final is None:
            final = (
                k_tilde.new_full((B, H), -math.inf, dtype=work),
                k_tilde.new_zeros(B, H, D, dtype=work),
            )
        return k_tilde.clone(), final if output_final_state else None
    log_scale, state = _chunked_state(
        k_tilde.to(work),
        log_gate.to(work),
        log_decay.to(work),
        doc_pos,
        chunk_size,
        _inner_log_dtype(k_tilde.device),
    )
    log_scale = log_scale.to(work)  # the weights inside ``state`` were formed in fp64
    if initial_state is not None:
        # carry weight exp(c0 - L_t) while no document has started in [0, t]
        c0, s0 = initial_state[0].to(work), initial_state[1].to(work)
        carried = (~reset).long().cumprod(-1).bool().unsqueeze(1)  # [B, 1, T]
        l_glob = log_decay.to(_inner_log_dtype(log_decay.device)).cumsum(-1)
        log_carry = torch.where(carried, (c0.to(l_glob.dtype).unsqueeze(-1) - l_glob), -math.inf)
        log_carry = log_carry.to(work)
        with torch.no_grad():
            top = torch.maximum(log_scale, log_carry)
        w_in = (log_scale - top).exp().unsqueeze(-1)
        w_carry = (log_carry - top).exp().unsqueeze(-1)  # 0 where not carried
        state = state * w_in + s0.unsqueeze(2) * w_carry
        log_scale = top
    keys = _normalize(log_scale, state, eps).to(k_tilde.dtype)
    final = (log_scale[..., -1], state[..., -1, :]) if output_final_state else None
    return keys, final


def gated_keys_chunked(
    k_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    doc_pos: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Gated time-variant key extractor of Eq. 8, chunked and parallel over time.

    Same contract as :func:`mm_megatron.ops.naive.gated_keys_naive`: computes
    k_T = Norm(Σ_{s ≤ T} exp(G_s − (L_T − L_s)) k̃_s) per document (the closed form of
    k̄_T = g_T k̃_T + λ_T k̄_{T-1}, reset at each document start), in log space.

    Args:
        k_tilde: ``[B, H, T, D]`` the projections W_φ x_T.
        log_gate: ``[B, H, T]`` W_g x_T (log of the input gate g_T).
        log_decay: ``[B, H, T]`` |W_λ x_T| (minus the log of the decay λ_T).
        doc_pos: ``[B, T]`` integer position of each token within its document.
        chunk_size: tokens per chunk C (>= 2); memory is O(T · C) per (batch, head).
    Returns:
        ``[B, H, T, D]`` unit-norm keys in ``k_tilde``'s dtype (computed in fp32, or fp64 for
        fp64 input).
    """
    _check_inputs(k_tilde, log_gate, log_decay, doc_pos, chunk_size)
    work = torch.float64 if k_tilde.dtype == torch.float64 else torch.float32
    if k_tilde.shape[2] == 0:
        return k_tilde.clone()
    log_scale, state = _chunked_state(
        k_tilde.to(work),
        log_gate.to(work),
        log_decay.to(work),
        doc_pos,
        chunk_size,
        _inner_log_dtype(k_tilde.device),
    )
    log_scale = log_scale.to(work)  # the weights inside ``state`` were formed in fp64
    return _normalize(log_scale, state, L2_EPS).to(k_tilde.dtype)
