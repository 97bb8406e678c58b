"""One op contract for the gated key extractor of Eq. 8, over two backends.

    keys, final_state = gated_key_scan(k_tilde, log_gate, log_decay, reset,
                                       initial_state=None, output_final_state=False, eps=1e-6)

computes k̄_t = g_t k̃_t + λ_t k̄_{t-1} (g_t = e^{log_gate_t}, λ_t = e^{−log_decay_t}, k̄ reset
to 0 where ``reset`` is True) and k_t = k̄_t / max(‖k̄_t‖, eps). The state is the pair
(c ``[B, H]``, S ``[B, H, D]``) meaning k̄ = e^c · S (c = −inf: empty), so it stays finite for
any gate; scanning [0, T) equals scanning [0, t) then [t, T) with the state carried, which is
how chunked training and token-by-token decoding share one definition. The Hugging Face
export's ``gated_key_scan`` is a marked copy of the torch backend (there the state is
``MemoryState.carry``), used for the whole sequence, the prefill and each decoding step.

Backends: ``"torch"`` (:func:`~mm_megatron.ops.gated_scan.gated_key_scan_torch`, chunked
log-space torch ops, any device and dtype), ``"triton"``
(:func:`~mm_megatron.ops.triton_scan.gated_key_scan_triton`, fused kernels; CUDA, or CPU
under ``TRITON_INTERPRET=1``), ``"auto"`` (Triton for CUDA fp32/bf16/fp16 tensors when triton
is importable, torch otherwise).
"""

from __future__ import annotations

from typing import Literal

import torch

from mm_megatron.ops.gated_scan import ScanState, gated_key_scan_torch
from mm_megatron.ops.naive import L2_EPS
from mm_megatron.ops.triton_scan import (
    HAS_TRITON,
    TRITON_DTYPES,
    gated_key_scan_triton,
    interpreter_requested,
)

__all__ = ["SCAN_BACKENDS", "ScanState", "gated_key_scan", "resolve_scan_backend"]

SCAN_BACKENDS = ("auto", "torch", "triton")
ScanBackend = Literal["auto", "torch", "triton"]


def triton_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the Triton scan cannot run on ``device`` (default: CUDA), or None if it can."""
    if not HAS_TRITON:
        return "the triton package is not importable"
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if interpreter_requested():
        return None
    return f"Triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {dev}"


def resolve_scan_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map ``backend`` (one of :data:`SCAN_BACKENDS`) to ``"torch"`` or ``"triton"``."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(
            f"unknown scan backend {backend!r}; expected one of {', '.join(SCAN_BACKENDS)}"
        )
    if backend == "torch":
        return "torch"
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"scan backend 'triton' requested but {reason}")
        return "triton"
    usable = HAS_TRITON and device.type == "cuda" and dtype in TRITON_DTYPES
    return "triton" if usable else "torch"


def gated_key_scan(
    k_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    reset: torch.Tensor,
    initial_state: ScanState | None = None,
    output_final_state: bool = False,
    eps: float = L2_EPS,
    *,
    backend: str = "auto",
    chunk_size: int = 64,
    block_t: int | None = None,
) -> tuple[torch.Tensor, ScanState | None]:
    """Gated key extractor of Eq. 8 with an initial/final state (see the module docstring).

    Args:
        k_tilde: ``[B, H, T, D]`` W_φ x. log_gate: ``[B, H, T]`` W_g x.
        log_decay: ``[B, H, T]`` |W_λ x|. reset: ``[B, T]`` bool, True at a document start.
        initial_state: ``(c [B, H], S [B, H, D])`` before the first token, or None (empty).
        output_final_state: also return the state after the last token.
        eps: floor of the L2 norm. backend: one of :data:`SCAN_BACKENDS`.
        chunk_size: tokens per chunk of the torch backend.
        block_t: tokens per tile of the Triton backend (a power of two; None: its default).
    Returns:
        unit keys ``[B, H, T, D]`` in ``k_tilde``'s dtype, and the final state (fp32; fp64
        for fp64 inputs on the torch backend) or None.
    """
    if resolve_scan_backend(backend, k_tilde.device, k_tilde.dtype) == "triton":
        return gated_key_scan_triton(
            k_tilde, log_gate, log_decay, reset, initial_state, output_final_state, eps, block_t
        )
    return gated_key_scan_torch(
        k_tilde, log_gate, log_decay, reset, initial_state, output_final_state, eps, chunk_size
    )
