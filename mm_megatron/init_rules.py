"""Table 6 initialisation of MM v2, one definition for every model that builds one.

Used by the Megatron-Core layers (:mod:`mm_megatron.layers`, :mod:`mm_megatron.specs`,
:mod:`mm_megatron.model`), by the plain reference (:mod:`mm_megatron.reference`), and copied
(marked ``# Copied from``) into the Hugging Face model file. The reference states the model;
these rules state how it starts, so neither depends on the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Table 6 initial values of the raw (reparameterised) per-head scalars; γ is drawn from U(0, 1).
TABLE6_SCALARS = {"beta0_raw": 1.5, "beta1_raw": 1.5, "alpha_raw": 1 / 3, "value_scale_raw": 0.0}


def table6_std(fan: int, layer_index: int) -> float:
    """Table 6: σ = 1/√(2·fan·(l+1)) for the matrices of block l (0-based)."""
    return 1.0 / math.sqrt(2 * fan * (layer_index + 1))


def table6_init_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """Table 6: N(0, σ) clipped to [-3σ, 3σ] (a truncated normal)."""
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


@torch.no_grad()
def init_head_scalars_(params: dict[str, torch.Tensor]) -> None:
    """Table 6 per-head scalars in place: :data:`TABLE6_SCALARS`, then γ ~ U(0, 1).

    Through ``nn.init``: transformers 5.x guards those functions while loading, so that
    weights read from a checkpoint are not initialised again (in-place tensor methods
    would overwrite them)."""
    for name, value in TABLE6_SCALARS.items():
        nn.init.constant_(params[name], value)
    nn.init.uniform_(params["gamma"], 0.0, 1.0)
