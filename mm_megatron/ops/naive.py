"""Plain, literal reference implementations of the two MM v2 primitives.

These are the ground truth every fast path is tested against. They favour reading like the
paper over speed: the key extractor is a T-step Python loop, the memories build a dense
T x T mask. Shapes follow the ``[batch, heads, time, head_dim]`` convention.

Document layout is given by ``doc_pos`` (``[batch, time]``, integer): the position of each
token inside its own document, 0 at a document's first token. Documents are contiguous, so
key ``j`` is in the same document as query ``p`` iff ``p - doc_pos[p] <= j <= p``.
"""

from __future__ import annotations

import torch

L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """Norm(x) of Eq. 8 and Eq. 9: divide each head vector by its L2 norm (no parameters)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def gated_keys_naive(
    k_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    doc_pos: torch.Tensor,
) -> torch.Tensor:
    """Gated time-variant key extractor, Eq. 8, as the literal recurrence.

    k̄_T = g_T · k̃_T + λ_T · k̄_{T-1},  g_T = exp(log_gate_T),  λ_T = exp(-log_decay_T),
    with k̄ reset to 0 before each document's first token; returns k_T = Norm(k̄_T).

    Args:
        k_tilde: ``[B, H, T, D]`` the projections W_φ x_T.
        log_gate: ``[B, H, T]`` W_g x_T (the log of the input gate g_T).
        log_decay: ``[B, H, T]`` |W_λ x_T| >= 0 (minus the log of the decay λ_T).
        doc_pos: ``[B, T]`` position of each token within its document.
    Returns:
        ``[B, H, T, D]`` unit-norm keys, in the dtype of ``k_tilde`` (computed in fp32 or fp64).
    """
    work = torch.float64 if k_tilde.dtype == torch.float64 else torch.float32
    kt = k_tilde.to(work)
    g = log_gate.to(work).exp()
    lam = (-log_decay.to(work)).exp()
    B, H, T, D = kt.shape
    state = kt.new_zeros(B, H, D)
    out = []
    for t in range(T):
        starts = (doc_pos[:, t] == 0).view(B, 1, 1)
        carried = torch.where(starts, torch.zeros_like(state), lam[:, :, t, None] * state)
        state = g[:, :, t, None] * kt[:, :, t] + carried
        out.append(state)
    k_bar = torch.stack(out, dim=2)
    return l2_normalize(k_bar).to(k_tilde.dtype)


def shifted_values(
    v_tilde: torch.Tensor, gamma: torch.Tensor, doc_pos: torch.Tensor
) -> torch.Tensor:
    """Value look-ahead of Eq. 9 before normalisation: v̄_T = γ ṽ_T + (1-γ) ṽ_{T+1}.

    ṽ_{T+1} is taken as 0 at the end of the sequence and at the last token of a document
    (that pair is never queried inside its document, so this only keeps documents
    independent of their neighbours).

    Args:
        v_tilde: ``[B, H, T, D]``; gamma: ``[H]``; doc_pos: ``[B, T]``.
    """
    nxt = torch.zeros_like(v_tilde)
    nxt[:, :, :-1] = v_tilde[:, :, 1:]
    same_doc_next = torch.zeros_like(doc_pos, dtype=torch.bool)
    same_doc_next[:, :-1] = doc_pos[:, 1:] != 0
    nxt = nxt * same_doc_next[:, None, :, None].to(v_tilde.dtype)
    g = gamma.to(v_tilde.dtype).view(1, -1, 1, 1)
    return g * v_tilde + (1 - g) * nxt


def visible_pairs(doc_pos: torch.Tensor, min_lag: int, max_lag: int | None) -> torch.Tensor:
    """Number n of key/value pairs a query sees (the n of Eq. 6), ``[B, T]`` integer.

    A memory at query position p holds the pairs j with ``min_lag <= p - j <= max_lag`` in the
    same document. Short-term memory (Eq. 10): min_lag 1, max_lag h-1, so n = min(p, h-1).
    Long-term memory: min_lag m, no max_lag, so n = max(p - m + 1, 0).
    """
    reach = doc_pos if max_lag is None else doc_pos.clamp(max=max_lag)
    return (reach - min_lag + 1).clamp_min(0)


def memory_mask(doc_pos: torch.Tensor, min_lag: int, max_lag: int | None) -> torch.Tensor:
    """Dense boolean mask ``[B, T, T]``, True where query p may read key j."""
    T = doc_pos.shape[1]
    idx = torch.arange(T, device=doc_pos.device)
    lag = idx.view(1, T, 1) - idx.view(1, 1, T)  # p - j
    allowed = (lag >= min_lag) & (lag <= doc_pos.unsqueeze(-1))
    if max_lag is not None:
        allowed = allowed & (lag <= max_lag)
    return allowed


def adaptive_beta(
    n: torch.Tensor, beta0: torch.Tensor, beta1: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Adaptive bandwidth of Eq. 6, β(n) = β₁ · n^α + β₀, per (batch, head, query).

    ``n`` is ``[B, T]``; the per-head parameters are ``[H]`` (already reparameterised).
    Rows with n = 0 are empty and their β is irrelevant; n is clamped to 1 there so no
    0^α appears (its gradient in α would be NaN). Returns ``[B, H, T]``.
    """
    n = n.clamp_min(1).to(beta0.dtype).unsqueeze(1)  # [B, 1, T]

    def per_head(p: torch.Tensor) -> torch.Tensor:
        return p.view(1, -1, 1)

    return per_head(beta1) * n.pow(per_head(alpha)) + per_head(beta0)


def memory_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_pos: torch.Tensor,
    min_lag: int,
    max_lag: int | None,
) -> torch.Tensor:
    """Associative memory read of Eq. 4 with the masks of Eq. 10, by a dense masked softmax.

    y_p = Σ_j softmax_j(q_p · k_j) v_j over the allowed pairs j; softmax scale 1 (the
    bandwidth β is already inside q). Queries with no allowed pair output exactly 0, with
    finite gradients.

    Args:
        q, k, v: ``[B, H, T, D]``. doc_pos: ``[B, T]``.
    """
    allowed = memory_mask(doc_pos, min_lag, max_lag).unsqueeze(1)  # [B, 1, T, T]
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2))
    scores = scores.masked_fill(~allowed, torch.finfo(work).min)
    probs = torch.softmax(scores, dim=-1) * allowed.to(work)
    return torch.matmul(probs, v.to(work)).to(v.dtype)
