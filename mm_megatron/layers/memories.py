"""The contextual memories of an MM v2 layer as a Megatron-Core module (paper §3, Eq. 6-10).

``MMMemories`` sits in the ``self_attention`` slot of Megatron's ``TransformerLayer``. It
replaces attention by a short-term and a long-term associative memory, each with its own
gated key extractor (Eq. 8), look-ahead value extractor (Eq. 9) and adaptive bandwidth
(Eq. 6), read through the masks of Eq. 10, then W_o (2d → d).

Tensor parallelism splits the H heads of each memory over the TP ranks:

* ``linear_in`` (column-parallel, d → H·M·(2·d_h + 2), M memories) holds, head by head and
  memory by memory, the rows [W_φ (d_h), W_ψ (d_h), W_g (1), W_λ (1)]. A contiguous split of
  its output therefore gives each rank whole heads of every memory.
* ``linear_out`` (row-parallel, H·M·d_h → d) is W_o with input columns in the same head-major
  order (head h: [y^S_h, y^L_h]).
* The per-head scalars (β₀, β₁, α, γ, α_ψ; ``[H_local, M]``) live on their heads' rank and are
  declared TP-sharded along axis 0 for distributed checkpoints.

:mod:`mm_megatron.convert.mm_layout` converts between this layout and the paper's separate
matrices (the reference model). Under sequence parallelism ``linear_in`` all-gathers the
sequence, so the key scan and the value shift see whole sequences.

The document layout arrives in Megatron's ``packed_seq_params`` argument as a
:class:`~mm_megatron.layers.packed_seq.MMPackedSeqParams` (see
:class:`mm_megatron.model.MMGPTModel`): ``doc_pos`` (``[b, s]`` position of each token within
its document) and the FlexAttention block masks of that layout, built once per forward pass
and shared by all layers and by activation recompute (Megatron passes ``packed_seq_params``
to the layers by closure, not through the checkpointed inputs, so the recomputed layers get
the same object).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import nn

from mm_megatron.config import ModelConfig
from mm_megatron.init_rules import init_head_scalars_, table6_std
from mm_megatron.layers.init import table6_init_method
from mm_megatron.layers.packed_seq import MMPackedSeqParams
from mm_megatron.layers.recompute import core_then_output, selective_core_recompute
from mm_megatron.memory_math import (
    HEAD_SCALARS,
    associative_memory,
    default_doc_pos,
    memory_span,
)
from mm_megatron.ops.memory_masks import MemoryMasks
from mm_megatron.profiling import nvtx_range, nvtx_wrap


@dataclass
class MMMemoriesSubmodules:
    """Linear classes of the memories mixer (local or Transformer Engine)."""

    linear_in: ModuleSpec | type | None = None
    linear_out: ModuleSpec | type | None = None


class MMMemories(MegatronModule):
    """Short- and long-term associative memories of one MM v2 layer."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MMMemoriesSubmodules,
        layer_number: int,
        mm: ModelConfig,
        pg_collection: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.mm = mm
        self.layer_number = layer_number  # 1-based and global, as in Megatron
        tp_group = self.tp_group = pg_collection.tp
        self.tp_size, self.tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        if mm.num_heads % self.tp_size:
            raise ValueError(
                f"model.num_heads ({mm.num_heads}) is not divisible by tensor parallel size "
                f"({self.tp_size})"
            )
        self.kinds = mm.memory_kinds
        self.num_heads_local = mm.num_heads // self.tp_size
        self.head_dim = mm.head_dim
        self.ltm_offset: int | None = None  # set each training step; None = inference m
        self.recompute_core = selective_core_recompute(config)  # train.recompute: selective
        d, M = config.hidden_size, len(self.kinds)
        self.in_width = 2 * self.head_dim + 2  # per head and memory: φ, ψ, g, λ
        init = table6_init_method(table6_std(d, layer_number - 1))
        self.linear_in = build_module(
            submodules.linear_in,
            d,
            mm.num_heads * M * self.in_width,
            config=config,
            init_method=init,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=tp_group,
        )
        self.linear_out = build_module(
            submodules.linear_out,
            mm.num_heads * M * self.head_dim,
            d,
            config=config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=tp_group,
        )
        # Per-head scalars, Table 6. γ ~ U(0,1) is drawn for all heads, then this rank's
        # heads are kept, so the model does not depend on the TP size.
        H = mm.num_heads
        first = self.tp_rank * self.num_heads_local
        heads = slice(first, first + self.num_heads_local)
        full = {name: torch.empty(H, M) for name in HEAD_SCALARS}
        init_head_scalars_(full)
        device = self.linear_in.weight.device
        for name in HEAD_SCALARS:
            param = nn.Parameter(full[name][heads].to(device=device, dtype=torch.float32))
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
            setattr(self, name, param)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed_seq_params: MMPackedSeqParams | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states`` ``[s(/tp), b, d]`` → ``(output [s(/tp), b, d], bias)``.

        ``packed_seq_params``: the documents of the batch (``doc_pos`` ``[b, s]`` and this
        forward pass's block masks); None: one document per row, masks built for this layer
        call only. The memories take no ``attention_mask`` or ``attention_bias`` (they must be
        None).
        """
        if attention_mask is not None or kwargs.get("attention_bias") is not None:
            raise ValueError(
                "MMMemories takes no attention_mask or attention_bias: the documents arrive in "
                "packed_seq_params as an MMPackedSeqParams"
            )
        if packed_seq_params is not None and not isinstance(packed_seq_params, MMPackedSeqParams):
            raise ValueError(
                "MMMemories expects packed_seq_params to be None or an MMPackedSeqParams "
                f"(per-token document positions), got {type(packed_seq_params).__name__}"
            )
        with nvtx_range("mm/linear_in"):
            proj, _ = self.linear_in(hidden_states)  # [s, b, H_local * M * (2 d_h + 2)]
        s, b = proj.shape[0], proj.shape[1]
        if packed_seq_params is None:
            doc_pos, masks = default_doc_pos(b, s, proj.device), None
        else:
            packed_seq_params.check_batch(b, s)
            doc_pos, masks = packed_seq_params.doc_pos, packed_seq_params.masks
        m = self.ltm_offset if self.ltm_offset is not None else self.mm.ltm_offset_inference
        core = partial(self._memory_core, m=m, masks=masks)
        return core_then_output(core, self._linear_out, (proj, doc_pos), self.recompute_core)

    def _linear_out(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with nvtx_range("mm/linear_out"):
            return self.linear_out(y)

    def _memory_core(
        self, proj: torch.Tensor, doc_pos: torch.Tensor, m: int, masks: MemoryMasks | None
    ) -> torch.Tensor:
        """Key scan, values and memory reads of every memory: projections ``[s, b, ...]`` →
        memory outputs ``[s, b, H_local * M * d_h]`` (the input of ``linear_out``)."""
        s, b = proj.shape[0], proj.shape[1]
        dh = self.head_dim
        proj = proj.view(s, b, self.num_heads_local, len(self.kinds), self.in_width)
        key_scan = nvtx_wrap("mm/key_scan", self._key_scan)
        read = nvtx_wrap("mm/memory_read", partial(self._memory_read, masks))
        ys = []
        for i, kind in enumerate(self.kinds):
            p = proj[:, :, :, i].permute(1, 2, 0, 3)  # [b, H, s, 2 d_h + 2]
            with nvtx_range(f"mm/memory/{kind}"):
                ys.append(
                    associative_memory(
                        k_tilde=p[..., :dh],
                        v_tilde=p[..., dh : 2 * dh],
                        log_gate=p[..., 2 * dh],
                        decay_logit=p[..., 2 * dh + 1],
                        scalars={name: getattr(self, name)[:, i] for name in HEAD_SCALARS},
                        doc_pos=doc_pos,
                        span=memory_span(kind, self.mm.stm_max_lag, m),
                        key_scan=key_scan,
                        read=read,
                    )
                )
        y = torch.stack(ys, dim=3)  # [b, H, s, M, d_h]
        return y.permute(2, 0, 1, 3, 4).reshape(s, b, -1)

    def _key_scan(
        self,
        k_tilde: torch.Tensor,
        log_gate: torch.Tensor,
        log_decay: torch.Tensor,
        doc_pos: torch.Tensor,
    ) -> torch.Tensor:
        from mm_megatron.ops.key_scan import gated_key_scan

        keys, _ = gated_key_scan(
            k_tilde,
            log_gate,
            log_decay,
            doc_pos == 0,
            backend=self.mm.scan_backend,
            chunk_size=self.mm.scan_chunk_size,
        )
        return keys

    def _memory_read(self, masks: MemoryMasks | None, *args: Any) -> torch.Tensor:
        from mm_megatron.ops.memory_attention import memory_attention

        return memory_attention(*args, backend=self.mm.memory_backend, masks=masks)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """Distributed-checkpoint view: the per-head scalars are TP-sharded along heads."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own: dict[str, Any] = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            own,
            prefix,
            {name: 0 for name in HEAD_SCALARS},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            sharded.update(
                sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            )
        return sharded


def set_ltm_offset(model: nn.Module, m: int | None) -> None:
    """Set the long-term memory offset m on every MM v2 layer (None: the inference m)."""
    for module in model.modules():
        if hasattr(module, "ltm_offset"):
            module.ltm_offset = m
