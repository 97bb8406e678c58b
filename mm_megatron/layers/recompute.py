"""Selective activation recompute of the MM v2 memory core (``train.recompute: selective``).

The memory core of a layer is everything between its two GEMMs: the gated key scan (Eq. 8),
the value shift (Eq. 9), the adaptive bandwidth (Eq. 6) and the two masked memory reads
(Eq. 4/10). It is cheap in FLOPs next to the projections but holds most of the layer's
activations (chunked scan buffers, per-memory keys, values, queries). Selective recompute
keeps the GEMM outputs (the input projection, which is the core's input) and drops the rest,
including the core's output, which ``linear_out`` would otherwise keep for its weight
gradient: Megatron's :class:`CheckpointWithoutOutput` runs the core without autograd, frees
its output once ``linear_out`` has consumed it, and recomputes it (with autograd) when the
gradient of ``linear_out``'s output arrives, just before ``linear_out``'s backward needs it.

It is switched on by ``TransformerConfig.recompute_granularity == "selective"`` with
``"core_attn"`` in ``recompute_modules`` (the memories sit in the attention slot, and the same
setting makes the transformer baseline recompute its core attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig


def selective_core_recompute(config: TransformerConfig) -> bool:
    """True when ``config`` asks for selective recompute of the core (attention or memories)."""
    return config.recompute_granularity == "selective" and "core_attn" in (
        config.recompute_modules or ()
    )


def core_then_output(
    core: Callable[..., torch.Tensor],
    linear_out: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
    inputs: tuple[Any, ...],
    recompute: bool,
) -> tuple[torch.Tensor, Any]:
    """``linear_out(core(*inputs))``, recomputing the core in backward when ``recompute``.

    ``core`` must be a pure function of ``inputs`` (and of state that does not change before
    the backward pass); it has no dropout, so no RNG state matters.
    """
    if not recompute or not torch.is_grad_enabled():
        return linear_out(core(*inputs))
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    ckpt = CheckpointWithoutOutput(fp8=None)  # fp8=None: no FP8 context (fp8=False enables it)
    y = ckpt.checkpoint(core, *inputs)
    out, bias = linear_out(y)
    ckpt.discard_output_and_register_recompute(out)
    return out, bias
