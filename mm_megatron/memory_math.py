"""One associative memory of an MM v2 layer, from projections to read-out (paper §3).

Shared by the plain reference (:mod:`mm_megatron.reference`, literal ops) and the
Megatron-Core layer (:mod:`mm_megatron.layers.memories`, fast ops), so both compute the same
function and differ only in parameter layout, parallelism and kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mm_megatron.ops.naive import adaptive_beta, l2_normalize, shifted_values, visible_pairs

# The raw (reparameterised) per-head scalars of each memory; Table 6 initialises them
# (:func:`mm_megatron.init_rules.init_head_scalars_`).
HEAD_SCALARS = ("beta0_raw", "beta1_raw", "alpha_raw", "gamma", "value_scale_raw")


@dataclass(frozen=True)
class MemorySpan:
    """Which stored pairs a query at position p reads: lags p - j in [min_lag, max_lag]."""

    min_lag: int
    max_lag: int | None


def memory_span(kind: str, stm_max_lag: int, ltm_offset: int) -> MemorySpan:
    """Short-term memory: pairs t-h+1..t-1 (Eq. 10). Long-term memory: pairs 1..t-m (§3.3)."""
    if kind == "short":
        return MemorySpan(1, stm_max_lag)
    if kind == "long":
        return MemorySpan(ltm_offset, None)
    raise ValueError(f"unknown memory kind {kind!r}")


def bandwidth_params(
    beta0_raw: torch.Tensor, beta1_raw: torch.Tensor, alpha_raw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Table 6 reparameterisation: β₀ = e^{min(θ,10)}, β₁ = e^{min(θ,10)}, α = min(|θ|, 1)."""
    beta0 = beta0_raw.float().clamp(max=10.0).exp()
    beta1 = beta1_raw.float().clamp(max=10.0).exp()
    alpha = alpha_raw.float().abs().clamp(max=1.0)
    return beta0, beta1, alpha


def value_scale(value_scale_raw: torch.Tensor) -> torch.Tensor:
    """α_ψ = e^{min(|θ|, 15)} (Table 6)."""
    return value_scale_raw.float().abs().clamp(max=15.0).exp()


KeyScan = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MemoryRead = Callable[..., torch.Tensor]


def associative_memory(
    k_tilde: torch.Tensor,
    v_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    decay_logit: torch.Tensor,
    scalars: dict[str, torch.Tensor],
    doc_pos: torch.Tensor,
    span: MemorySpan,
    key_scan: KeyScan,
    read: MemoryRead,
) -> torch.Tensor:
    """Output y of one memory (STM or LTM) for all positions, ``[B, H, T, D]``.

    Args:
        k_tilde: W_φ x, ``[B, H, T, D]``. v_tilde: W_ψ x, ``[B, H, T, D]``.
        log_gate: W_g x, ``[B, H, T]`` (g = e^{W_g x}, Eq. 8).
        decay_logit: W_λ x, ``[B, H, T]`` (λ = e^{-|W_λ x|}, Eq. 8).
        scalars: per-head raw parameters named as in HEAD_SCALARS, each ``[H]``.
        doc_pos: ``[B, T]`` position of each token within its document.
        span: the lags this memory reads (Eq. 10).
        key_scan: ``(k_tilde, log_gate, log_decay, doc_pos) -> unit keys`` (Eq. 8).
        read: ``(q, k, v, doc_pos, min_lag, max_lag) -> y`` (Eq. 4 with the span's mask).
    """
    keys = key_scan(k_tilde, log_gate, decay_logit.abs(), doc_pos)
    v_bar = shifted_values(v_tilde, scalars["gamma"], doc_pos)  # Eq. 9
    alpha_psi = value_scale(scalars["value_scale_raw"]).to(v_bar.dtype).view(1, -1, 1, 1)
    values = alpha_psi * l2_normalize(v_bar)
    beta0, beta1, alpha = bandwidth_params(
        scalars["beta0_raw"], scalars["beta1_raw"], scalars["alpha_raw"]
    )
    n = visible_pairs(doc_pos, span.min_lag, span.max_lag)
    beta = adaptive_beta(n, beta0, beta1, alpha)  # Eq. 6, [B, H, T]
    queries = keys * beta.unsqueeze(-1).to(keys.dtype)
    return read(queries, keys, values, doc_pos, span.min_lag, span.max_lag)


def default_doc_pos(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """One document per row: positions 0..seq-1."""
    return torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
