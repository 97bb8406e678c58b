"""RMSNorm usable under sequence parallelism without apex or Transformer Engine.

Megatron-Core's torch fallback (``WrappedTorchNorm``) refuses ``sequence_parallel``. Under SP
each tensor-parallel rank normalises its own slice of the sequence, so the weight gradient
is partial and must be all-reduced over the TP group; Megatron does that for every parameter
tagged ``sequence_parallel = True`` (``finalize_model_grads``). This module sets that tag.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer import TransformerConfig
from torch import nn

from mm_megatron.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """Pre-norm RMSNorm with a learnable gain, computed in fp32 (§3.3, Fig. 2 right)."""

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs: Any
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
