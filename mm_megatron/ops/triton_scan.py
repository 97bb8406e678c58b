"""Fused Triton key scan of Eq. 8 (forward and backward) with an initial/final state.

k̄_t = g_t k̃_t + λ_t k̄_{t-1},  g_t = e^{W_g x_t},  λ_t = e^{−|W_λ x_t|},  k_t = Norm(k̄_t),
with k̄ reset at document starts. The kernels (:mod:`._scan_kernels`) keep the state as
(c, S), k̄ = e^c · S, in fp32 registers, read k̃ (bf16/fp16/fp32, any strides) once and write
the normalised keys once: the normalisation and its gradient are fused into the kernels.

The backward pass recomputes each tile's states from a checkpoint stored every ``block_t``
tokens by the forward pass (see the kernel module for the memory/time trade-off).

Triton is optional: importing this module never fails; :data:`HAS_TRITON` says whether the
kernels can run. CUDA tensors run the compiled kernels; CPU tensors run Triton's interpreter,
only when ``TRITON_INTERPRET=1`` is set in the environment (slow, for tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from mm_megatron.ops.naive import L2_EPS

__all__ = ["HAS_TRITON", "TRITON_DTYPES", "gated_key_scan_triton", "interpreter_requested"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNELS: dict[bool, ModuleType] = {}


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET=1`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _kernels(interpret: bool) -> ModuleType:
    """The kernel module, compiled (``interpret=False``) or for the interpreter.

    Triton decides at decoration time whether a ``@triton.jit`` function is interpreted, so
    each mode gets its own copy of the module, loaded with ``TRITON_INTERPRET`` set for it.
    """
    if interpret not in _KERNELS:
        if not HAS_TRITON:
            raise RuntimeError("the Triton key scan needs the triton package")
        path = os.path.join(os.path.dirname(__file__), "_scan_kernels.py")
        name = f"{__package__}._scan_kernels_{'interp' if interpret else 'cuda'}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        with _env("TRITON_INTERPRET", "1" if interpret else None):
            sys.modules[name] = module
            spec.loader.exec_module(module)
        _KERNELS[interpret] = module
    return _KERNELS[interpret]


def _launch_config(device: torch.device, D: int, block_t: int | None) -> tuple[Any, int, int]:
    if device.type == "cuda":
        kern = _kernels(False)
    elif interpreter_requested():
        kern = _kernels(True)
    else:
        raise RuntimeError(
            "the Triton key scan runs on CUDA tensors, or on CPU tensors under Triton's "
            "interpreter (TRITON_INTERPRET=1); got device " + str(device)
        )
    bd = max(triton_next_pow2(D), 2)
    bt = block_t or (16 if bd >= 256 else 32)
    return kern, bt, 8 if bd >= 128 else 4


def triton_next_pow2(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


class _GatedKeyScan(torch.autograd.Function):
    """Autograd of the fused scan; inputs and outputs as in :func:`gated_key_scan_triton`."""

    @staticmethod
    def forward(  # noqa: ANN205
        ctx: Any,
        k_tilde: torch.Tensor,
        log_gate: torch.Tensor,
        log_decay: torch.Tensor,
        reset: torch.Tensor,
        c0: torch.Tensor,
        s0: torch.Tensor,
        eps: float,
        block_t: int | None,
    ):
        B, H, T, D = k_tilde.shape
        kern, bt, warps = _launch_config(k_tilde.device, D, block_t)
        nt = -(-T // bt)
        dev = k_tilde.device
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5))
        out = torch.empty(B, H, T, D, device=dev, dtype=k_tilde.dtype)
        c_t = torch.empty(B, H, device=dev, dtype=torch.float32)
        s_t = torch.empty(B, H, D, device=dev, dtype=torch.float32)
        n_ck = nt if needs_grad else 1
        ck_c = torch.empty(B * H * n_ck, device=dev, dtype=torch.float32)
        ck_s = torch.empty(B * H * n_ck, D, device=dev, dtype=torch.float32)
        kern.scan_fwd_kernel[(B * H,)](
            k_tilde,
            log_gate,
            log_decay,
            reset,
            c0,
            s0,
            out,
            c_t,
            s_t,
            ck_c,
            ck_s,
            H,
            T,
            D,
            nt,
            *k_tilde.stride(),
            *log_gate.stride(),
            *log_decay.stride(),
            *reset.stride(),
            math.log(eps),
            STORE_CKPT=needs_grad,
            BT=bt,
            BD=triton_next_pow2(D),
            num_warps=warps,
        )
        ctx.save_for_backward(k_tilde, log_gate, log_decay, reset, c0, s0, ck_c, ck_s, c_t)
        ctx.cfg = (eps, bt, warps, nt)
        ctx.mark_non_differentiable(c_t)
        return out, c_t, s_t

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor, _dc: torch.Tensor | None, d_s: torch.Tensor | None):  # noqa: ANN205, E501
        k_tilde, log_gate, log_decay, reset, c0, s0, ck_c, ck_s, c_t = ctx.saved_tensors
        eps, bt, warps, nt = ctx.cfg
        B, H, T, D = k_tilde.shape
        kern, _, _ = _launch_config(k_tilde.device, D, bt)
        dev = k_tilde.device
        if d_out is None:
            d_out = torch.zeros(B, H, T, D, device=dev, dtype=k_tilde.dtype)
        d_s = torch.zeros_like(s0) if d_s is None else d_s.float().contiguous()
        dx = torch.empty(B, H, T, D, device=dev, dtype=k_tilde.dtype)
        dg = torch.empty(B, H, T, device=dev, dtype=log_gate.dtype)
        dl = torch.empty(B, H, T, device=dev, dtype=log_decay.dtype)
        d0 = torch.empty(B, H, device=dev, dtype=torch.float32)
        dd0 = torch.empty(B, H, D, device=dev, dtype=torch.float32)
        kern.scan_bwd_kernel[(B * H,)](
            k_tilde,
            log_gate,
            log_decay,
            reset,
            d_out,
            ck_c,
            ck_s,
            c_t,
            d_s,
            dx,
            dg,
            dl,
            d0,
            dd0,
            H,
            T,
            D,
            nt,
            *k_tilde.stride(),
            *log_gate.stride(),
            *log_decay.stride(),
            *reset.stride(),
            *d_out.stride(),
            math.log(eps),
            BT=bt,
            BD=triton_next_pow2(D),
            num_warps=warps,
        )
        # δ at t = 0 reaches the initial state through λ_0 (not at a reset):
        # ∂L/∂S₀ = e^{c₀} λ_0 δ_0 = e^{c₀ − ℓ_0 + d_0} Δ_0, and ∂L/∂c₀ = S₀ · ∂L/∂S₀.
        dc0 = ds0 = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            live = (reset[:, :1] == 0) & torch.isfinite(c0) & torch.isfinite(d0)
            w = torch.where(live, (c0 - log_decay[..., 0].float() + d0), -math.inf).exp()
            ds0 = w.unsqueeze(-1) * dd0
            dc0 = (ds0 * s0).sum(-1)
        return dx, dg, dl, None, dc0, ds0, None, None


def gated_key_scan_triton(
    k_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    reset: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = L2_EPS,
    block_t: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Eq. 8 with a carried state, by the fused Triton kernels.

    Args:
        k_tilde: ``[B, H, T, D]`` W_φ x (fp32, bf16 or fp16; any strides).
        log_gate: ``[B, H, T]`` W_g x. log_decay: ``[B, H, T]`` |W_λ x|.
        reset: ``[B, T]`` bool, True at a document's first token.
        initial_state: ``(c [B, H], S [B, H, D])`` meaning k̄ = e^c S before the first
            token, or None (empty). Gradients flow into both.
        output_final_state: also return the fp32 state after the last token. Its gradient is
            taken as that of k̄ = e^c S (c is a stabiliser: a gradient on c is not used).
        eps: floor of the L2 norm. block_t: tokens per tile (a power of two; default 32).
    Returns:
        keys ``[B, H, T, D]`` in ``k_tilde``'s dtype, and ``(c, S)`` or None.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton key scan needs the triton package")
    B, H, T, D = k_tilde.shape
    if k_tilde.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton key scan takes fp32/bf16/fp16 k_tilde, got {k_tilde.dtype}")
    for name, t in (("log_gate", log_gate), ("log_decay", log_decay)):
        if tuple(t.shape) != (B, H, T):
            raise ValueError(f"{name} must be [B, H, T] = {(B, H, T)}, got {tuple(t.shape)}")
    if tuple(reset.shape) != (B, T):
        raise ValueError(f"reset must be [B, T] = {(B, T)}, got {tuple(reset.shape)}")
    if block_t is not None and (block_t < 2 or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be a power of two >= 2, got {block_t}")
    dev = k_tilde.device
    if initial_state is None:
        c0 = torch.full((B, H), -math.inf, device=dev, dtype=torch.float32)
        s0 = torch.zeros(B, H, D, device=dev, dtype=torch.float32)
    else:
        c0, s0 = initial_state
        if tuple(c0.shape) != (B, H) or tuple(s0.shape) != (B, H, D):
            raise ValueError(
                f"initial_state must be (c [B, H], S [B, H, D]) = ({(B, H)}, {(B, H, D)}), "
                f"got ({tuple(c0.shape)}, {tuple(s0.shape)})"
            )
        c0, s0 = c0.float().contiguous(), s0.float().contiguous()
    if T == 0:
        final = (c0, s0) if output_final_state else None
        return k_tilde.clone(), final
    r8 = reset.to(device=dev, dtype=torch.int8)
    keys, c_t, s_t = _GatedKeyScan.apply(k_tilde, log_gate, log_decay, r8, c0, s0, eps, block_t)
    return keys, ((c_t, s_t) if output_final_state else None)
