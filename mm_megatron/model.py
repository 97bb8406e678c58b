"""Model builders: MM v2 and the transformer baseline on Megatron-Core's ``GPTModel``.

MM v2 uses no position encoding (``position_embedding_type="none"``) and untied embeddings;
the baseline uses RoPE. Both work as pipeline stages (``pre_process``/``post_process``,
``vp_stage``).

Document boundaries reach the MM v2 memories through ``position_ids``: the position of each
token within its document (Megatron's ``GPTDataset`` produces exactly that with
``reset_position_ids=True``). :class:`MMGPTModel` forwards them to every layer in Megatron's
``packed_seq_params`` argument, as a :class:`~mm_megatron.layers.packed_seq.MMPackedSeqParams`
that also carries the block masks of the memories (built once per forward pass, shared by
every layer and by activation recompute).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from mm_megatron.config import ModelConfig, ParallelConfig, validate_layout
from mm_megatron.layers.init import table6_init_method
from mm_megatron.layers.packed_seq import MMPackedSeqParams
from mm_megatron.memory_math import default_doc_pos
from mm_megatron.ops.naive import memory_mask
from mm_megatron.specs import block_spec, resolve_backend


def transformer_config(
    mm: ModelConfig,
    parallel: ParallelConfig | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` for a model config and parallel layout.

    ``params_dtype=torch.bfloat16`` turns on bf16 mixed precision (fp32 main weights live in
    the optimizer). Extra keyword arguments are passed to ``TransformerConfig`` (recompute
    settings, fusions).
    """
    parallel = parallel or ParallelConfig()
    validate_layout(mm, parallel)
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    if mm.arch == "mm":
        init_method = table6_init_method(1.0 / math.sqrt(2 * mm.hidden_size))  # W_e, W_c
        extra: dict[str, Any] = dict(init_method=init_method, output_layer_init_method=init_method)
    else:
        extra = {"init_method_std": mm.init_method_std}
    kwargs: dict[str, Any] = dict(
        num_layers=mm.num_layers,
        hidden_size=mm.hidden_size,
        num_attention_heads=mm.num_heads,
        kv_channels=mm.head_dim,
        ffn_hidden_size=mm.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=mm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **extra,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class MMGPTModel(GPTModel):
    """GPTModel whose layers receive document positions instead of an attention mask."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        packed_seq_params: MMPackedSeqParams | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``position_ids`` ``[b, s]``: position of each token within its document (None:
        one document per row). ``attention_mask`` is ignored: the memories read the masks of
        Eq. 10, built from the document positions once per forward pass (lazily: only the flex
        backend builds block masks). The layers get both in ``packed_seq_params``: the one
        given (an :class:`MMPackedSeqParams`; ``position_ids`` then only reach the embedding,
        which ignores them), or by default one built here from ``position_ids``."""

        if packed_seq_params is None:
            if position_ids is None:
                if input_ids is not None:  # [b, s]
                    (b, s), device = input_ids.shape[:2], input_ids.device
                else:  # a later pipeline stage's decoder_input: [s, b, h]
                    decoder_input = kwargs["decoder_input"]
                    (s, b), device = decoder_input.shape[:2], decoder_input.device
                position_ids = default_doc_pos(b, s, device)
            packed_seq_params = MMPackedSeqParams.for_doc_pos(position_ids)
        elif not isinstance(packed_seq_params, MMPackedSeqParams):
            raise ValueError(
                "MMGPTModel takes packed_seq_params only as an MMPackedSeqParams (per-token "
                f"document positions), got {type(packed_seq_params).__name__}"
            )
        return super().forward(
            input_ids, position_ids, None, packed_seq_params=packed_seq_params, **kwargs
        )


def build_model(
    mm: ModelConfig,
    config: TransformerConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    init_seed: int | None = None,
    fuse_norm_linear: bool = False,
) -> GPTModel:
    """Build this process's part of the model (one pipeline stage, or all of it).

    With ``init_seed`` the initial weights are the same whatever the TP/PP/VPP layout (CPU
    initialisation; each layer seeds itself from (init_seed, its global index)).
    ``fuse_norm_linear`` (MM v2, Transformer Engine backend): the pre-norms fused into the
    memories' input projection and fc1 (see :func:`mm_megatron.specs.mm_layer_spec`).
    """
    resolve_backend(mm.backend)  # fail early with a clear message
    tp = config.tensor_model_parallel_size
    if init_seed is not None:
        torch.manual_seed(init_seed)
    common = dict(
        config=config,
        transformer_layer_spec=block_spec(mm, config, vp_stage, init_seed, fuse_norm_linear),
        vocab_size=mm.padded_vocab_size(tp),
        max_sequence_length=mm.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        vp_stage=vp_stage,
    )
    if mm.arch == "mm":
        return MMGPTModel(position_embedding_type="none", **common)
    return GPTModel(position_embedding_type="rope", rotary_base=mm.rotary_base, **common)


def document_causal_mask(doc_pos: torch.Tensor) -> torch.Tensor:
    """Dense ``[b, 1, s, s]`` mask (True = masked) for the baseline's document-wise causal
    attention: query p sees keys j with p - doc_pos[p] <= j <= p."""
    return (~memory_mask(doc_pos, min_lag=0, max_lag=None)).unsqueeze(1)


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Megatron's tensor/pipeline/data-parallel groups for ``parallel`` and its model-parallel
    random seeds (the process group must exist; once per process)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
    )
    model_parallel_cuda_manual_seed(seed)


def build_stage(
    model_cfg: ModelConfig,
    config: TransformerConfig,
    vp_stage: int | None = None,
    **build_kwargs: Any,
) -> Any:
    """This rank's pipeline stage of the model (the chunk ``vp_stage`` of it under the
    interleaved schedule): embedding on the first stage, output layer on the last.
    ``build_kwargs`` go to :func:`mm_megatron.model.build_model` (``init_seed``, ...)."""
    whole = vp_stage is None  # without virtual stages: this rank's pipeline stage
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=whole, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=whole, vp_stage=vp_stage)
    return build_model(
        model_cfg, config, pre_process=first, post_process=last, vp_stage=vp_stage, **build_kwargs
    )
