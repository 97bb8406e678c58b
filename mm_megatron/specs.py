"""ModuleSpecs for MM v2 and the Llama-style transformer baseline.

Both are Megatron ``TransformerLayer`` stacks; MM v2 puts :class:`MMMemories` in the
``self_attention`` slot and keeps Megatron's MLP as the SwiGLU persistent memory. The block
spec lists one layer spec per local layer (Table 6 scales each layer's init by its depth)
and an SP-capable final norm.

Backends: ``local`` uses Megatron-Core's own linears and our RMSNorm (CPU, any GPU);
``transformer_engine`` uses TE linears and TENorm; ``auto`` picks TE when it is installed
and CUDA is present.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from mm_megatron.config import ModelConfig
from mm_megatron.init_rules import table6_std
from mm_megatron.layers.init import depth_scaled
from mm_megatron.layers.memories import MMMemories, MMMemoriesSubmodules
from mm_megatron.layers.norm import RMSNorm


class SeededTransformerLayer(TransformerLayer):
    """A TransformerLayer that draws its initial weights from a generator seeded by
    (init_seed, global layer index), so a model's initialisation does not depend on how its
    layers are split over pipeline stages (tensor parallelism is already invariant with CPU
    initialisation, which draws each full weight and keeps this rank's part)."""

    def __init__(
        self,
        config: TransformerConfig,
        *args: Any,
        init_seed: int,
        vp_stage: int | None = None,
        **kwargs: Any,
    ) -> None:
        layer_number = kwargs.get("layer_number", args[1] if len(args) > 1 else 1)
        global_layer = layer_number + get_transformer_layer_offset(config, vp_stage)
        torch.manual_seed((init_seed * 1_000_003 + global_layer) % 2**63)
        super().__init__(config, *args, vp_stage=vp_stage, **kwargs)


def _seeded(spec: ModuleSpec, init_seed: int | None) -> ModuleSpec:
    if init_seed is None:
        return spec
    return ModuleSpec(
        module=SeededTransformerLayer,
        params={**spec.params, "init_seed": init_seed},
        submodules=spec.submodules,
    )


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(name: str) -> str:
    """``auto`` → ``transformer_engine`` when usable, else ``local``; errors if TE is asked
    for but missing."""
    if name == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if name == "transformer_engine" and not transformer_engine_available():
        raise ValueError(
            "model.backend: transformer_engine needs CUDA and the transformer-engine package "
            "(pip install -r requirements-gpu.txt); use backend: local"
        )
    if name not in ("local", "transformer_engine"):
        raise ValueError(f"model.backend: unknown backend {name!r}")
    return name


def _provider_and_norm(backend: str) -> tuple[BackendSpecProvider, type]:
    if backend == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider(), TENorm
    return LocalSpecProvider(), RMSNorm


# Fused norm + linear keep the unfused checkpoint names (module key prefix → saved prefix).
FUSED_NORM_KEYS = {
    "self_attention.linear_in.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def mm_layer_spec(
    mm: ModelConfig, layer_index: int, backend: str = "local", fuse_norm_linear: bool = False
) -> ModuleSpec:
    """One MM v2 block: RMSNorm → memories → residual; RMSNorm → SwiGLU → residual.

    ``fuse_norm_linear`` (Transformer Engine only): each RMSNorm runs inside the linear that
    follows it (``TELayerNormColumnParallelLinear`` for the memories' input projection and
    fc1), as in Megatron's TE GPT spec; distributed checkpoints keep the unfused names.
    """
    if fuse_norm_linear and backend != "transformer_engine":
        raise ValueError("fuse_norm_linear needs the transformer_engine backend")
    provider, norm = _provider_and_norm(backend)
    column, row = provider.column_parallel_linear(), provider.row_parallel_linear()
    column_in = provider.column_parallel_layer_norm_linear() if fuse_norm_linear else column
    d, f = mm.hidden_size, mm.ffn_hidden_size
    memories = ModuleSpec(
        module=MMMemories,
        params={"mm": mm},
        submodules=MMMemoriesSubmodules(linear_in=column_in, linear_out=row),
    )
    fc1_std = table6_std(d, layer_index)
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=ModuleSpec(depth_scaled(column_in), {"init_std": fc1_std}),
            linear_fc2=ModuleSpec(depth_scaled(row), {"init_std": table6_std(f, layer_index)}),
        ),
    )
    layer_norm = IdentityOp if fuse_norm_linear else norm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=layer_norm,
            self_attention=memories,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=layer_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(FUSED_NORM_KEYS) if fuse_norm_linear else {},
        ),
    )


def transformer_layer_spec(backend: str = "local") -> ModuleSpec:
    """Llama-style baseline layer from Megatron's own GPT spec (RoPE is set on the model)."""
    if backend == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm  # SP-capable without apex/TE
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def block_spec(
    mm: ModelConfig,
    config: TransformerConfig,
    vp_stage: int | None = None,
    init_seed: int | None = None,
    fuse_norm_linear: bool = False,
) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage (and virtual stage) plus the final norm.

    With ``init_seed`` each layer seeds its own initialisation (see SeededTransformerLayer).
    ``fuse_norm_linear``: see :func:`mm_layer_spec` (MM v2 only; the TE baseline always fuses).
    """
    backend = resolve_backend(mm.backend)
    _, norm = _provider_and_norm(backend)
    offset = get_transformer_layer_offset(config, vp_stage)
    count = get_num_layers_to_build(config, vp_stage)
    if mm.arch == "mm":
        specs = [
            mm_layer_spec(mm, i, backend, fuse_norm_linear) for i in range(offset, offset + count)
        ]
    else:
        specs = [transformer_layer_spec(backend)] * count
    specs = [_seeded(spec, init_seed) for spec in specs]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm)
