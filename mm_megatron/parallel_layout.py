"""Map between a full (TP=1, PP=1) Megatron state dict and one rank's shard of it.

Megatron tags tensor-parallel parameters with ``tensor_model_parallel`` and
``partition_dim``; a rank holds the ``tp_rank``-th contiguous chunk along that dimension.
One exception: the SwiGLU ``linear_fc1`` weight is [W₁; W₃] in the full layout but each rank
holds [W₁ chunk; W₃ chunk]. Under pipeline parallelism a stage's ``decoder.layers.{i}`` is
global layer ``offset + i``. Used by tests (load the same weights into every layout, gather
gradients back) and by checkpoint tools.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import nn

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def global_name(local: str, layer_offset: int) -> str:
    """``decoder.layers.{i}.x`` of a pipeline stage → ``decoder.layers.{offset+i}.x``."""
    match = _LAYER.match(local)
    if not match:
        return local
    return f"{match.group(1)}{int(match.group(2)) + layer_offset}{match.group(3)}"


def _is_gated_fc1(name: str, config: TransformerConfig) -> bool:
    return config.gated_linear_unit and name.endswith("mlp.linear_fc1.weight")


def shard_tensor(
    full: torch.Tensor,
    param: nn.Parameter,
    name: str,
    config: TransformerConfig,
    tp_rank: int,
    tp_size: int,
) -> torch.Tensor:
    """This rank's part of ``full`` for parameter ``param``."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_gated_fc1(name, config):
        w1, w3 = full.chunk(2, dim=0)
        return torch.cat([w1.chunk(tp_size, 0)[tp_rank], w3.chunk(tp_size, 0)[tp_rank]])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard_tensors(
    parts: list[torch.Tensor], param: nn.Parameter, name: str, config: TransformerConfig
) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the TP ranks' parts, in rank order → full tensor."""
    if len(parts) == 1 or not getattr(param, "tensor_model_parallel", False):
        return parts[0]
    if _is_gated_fc1(name, config):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim=param.partition_dim)


def load_full_state_dict(
    model: nn.Module,
    full: dict[str, torch.Tensor],
    config: TransformerConfig,
    vp_stage: int | None = None,
) -> None:
    """Load a full Megatron state dict into this rank's (TP, PP) part of the model."""
    offset = get_transformer_layer_offset(config, vp_stage)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = global_name(name, offset)
            if key not in full:
                raise KeyError(f"{key}: not in the full state dict")
            part = shard_tensor(full[key], param, name, config, tp_rank, tp_size)
            if part.shape != param.shape:
                raise ValueError(f"{key}: shard {tuple(part.shape)} != param {tuple(param.shape)}")
            param.copy_(part)


def gather_full_tensors(
    model: nn.Module,
    values: dict[str, torch.Tensor],
    config: TransformerConfig,
    vp_stage: int | None = None,
) -> dict[str, torch.Tensor]:
    """Full tensors by global name from per-parameter ``values`` (e.g. grads) of every rank.

    Collective over the tensor- and pipeline-parallel groups; every rank gets the result.
    """
    offset = get_transformer_layer_offset(config, vp_stage)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    gathered: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        value = values[name].detach().contiguous()
        parts = [value]
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(value) for _ in range(tp_size)]
            dist.all_gather(parts, value, group=tp_group)
        gathered[global_name(name, offset)] = unshard_tensors(parts, param, name, config)
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size > 1:
        stages: list[dict[str, torch.Tensor] | None] = [None] * pp_size
        dist.all_gather_object(
            stages, gathered, group=parallel_state.get_pipeline_model_parallel_group()
        )
        gathered = {k: v for stage in stages if stage for k, v in stage.items()}
    return gathered
