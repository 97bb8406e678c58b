"""Model and parallelism configuration of MM v2 and its transformer baseline.

``ModelConfig`` is the ``model:`` section of a YAML config; ``ParallelConfig`` the
``parallel:`` section. In the paper's notation, h is ``short_window`` and m is
``ltm_offset_*``. :func:`mm_megatron.model.transformer_config` turns them into the
Megatron-Core ``TransformerConfig`` the layers are built from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mm_megatron.config_loading import ConfigError

Arch = Literal["mm", "transformer"]
Backend = Literal["auto", "local", "transformer_engine"]
MemoryBackend = Literal["auto", "dense", "flex"]
ScanBackend = Literal["auto", "torch", "triton"]


def max_ltm_offset(stm_max_lag: int) -> int:
    """The largest offset m of the long-term memory: the short-term memory reads lags
    1..stm_max_lag and the long-term memory lags ≥ m, so a larger m leaves some pairs in
    neither memory. With Eq. 10 (stm_max_lag = h - 1) this is the paper's m ≤ h (§3.3)."""
    return stm_max_lag + 1


@dataclass
class ModelConfig:
    """Architecture of one model (paper §3, §4 and App. C).

    ``num_heads`` is the head count *per memory type* for MM v2 (H short-term and H
    long-term heads, each of ``hidden_size / num_heads`` channels), and the attention head
    count for the transformer baseline.
    """

    arch: Arch
    """``mm``: Memory Mosaics v2 (no position encoding; §3); ``transformer``: the Llama-style
    baseline of §4 (multi-head attention with RoPE, SwiGLU, RMSNorm, untied embeddings)."""
    num_layers: int
    """Number of blocks N_b, >= 1 (App. C: 24 small, 32 large); a multiple of the number of
    pipeline stages (pipeline x virtual)."""
    hidden_size: int
    """Model width d, >= 1 (App. C: 2048 small, 4096 large); a multiple of ``num_heads``."""
    num_heads: int
    """Heads per memory type (MM v2) or attention heads (baseline), >= 1 (App. C: 16 small,
    32 large); divides ``hidden_size`` and is a multiple of the tensor-parallel size."""
    ffn_hidden_size: int
    """Hidden width d′ of the SwiGLU persistent memory / MLP, >= 1 (§3.3, App. C: 6144
    small, 14336 large); a multiple of the tensor-parallel size."""
    vocab_size: int
    """Vocabulary size V, >= 1 (Llama-3: 128256); at least the tokenizer's vocabulary (checked
    at the start of training). The embedding and classifier rows are padded (see
    ``make_vocab_size_divisible_by``)."""
    seq_length: int = 4096
    """Tokens per training sample, the context length of training (§4: 4096 for
    pre-training, 32768 for the long-context fine-tune); >= 2 for training, a multiple of
    the tensor-parallel size with sequence parallelism."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding and classifier rows to a multiple of this, >= 1, whatever the
    tensor-parallel size (which must divide the padded size), so that checkpoints move
    between layouts."""
    norm_epsilon: float = 1e-5
    """ε of every RMSNorm, > 0: x / sqrt(mean(x²) + ε) · g."""
    backend: Backend = "auto"
    """Megatron layer implementation: ``local`` (Megatron-Core's own modules),
    ``transformer_engine`` (needs CUDA and the transformer-engine package), ``auto``
    (Transformer Engine when usable, local otherwise)."""
    # Memory Mosaics v2 only.
    short_window: int = 256
    """h of Eq. 10, >= 2 (§4: 256): the short-term memory of query t holds the pairs
    t-h+1 .. t-1 (``stm_span``)."""
    stm_span: Literal["eq10", "fig11"] = "eq10"
    """Pairs of the short-term memory: ``eq10``: t-h+1 .. t-1 (h - 1 pairs, Eq. 10);
    ``fig11``: t-h .. t-1 (h pairs, as Fig. 11 draws it)."""
    ltm_offset_min: int = 64
    """Smallest LTM offset m in training (§4, "Stochastic long-term memory size": m ~
    U[64, 256]), >= 1: the long-term memory of query t holds the pairs 1 .. t-m. One m is
    drawn per optimizer step, uniformly in [ltm_offset_min, ltm_offset_max]."""
    ltm_offset_max: int = 256
    """Largest LTM offset m in training, in [ltm_offset_min, short_window] (m <= h, so every
    past pair is in at least one memory)."""
    ltm_offset_inference: int = 64
    """LTM offset m of validation, evaluation, generation and export, in [1, short_window]
    (§4: 64)."""
    long_term_memory: bool = True
    """False: short-term and persistent memory only, the "without LTM" ablation of Table 2
    (W_o then reads d inputs instead of 2d)."""
    scan_chunk_size: int = 64
    """Tokens per chunk of the torch key scan of Eq. 8, >= 2 (its memory is O(T x chunk) per
    head); the Triton scan does not use it."""
    memory_backend: MemoryBackend = "auto"
    """Memory reads of Eq. 4 under the masks of Eq. 10: ``dense`` (a T x T mask; reference
    and CPU path), ``flex`` (FlexAttention block masks, compiled on CUDA), ``auto`` (flex on
    CUDA, dense otherwise)."""
    scan_backend: ScanBackend = "auto"
    """Key scan of Eq. 8: ``triton`` (fused kernels; needs CUDA and the triton package),
    ``torch`` (chunked torch ops), ``auto`` (triton on CUDA when the triton package is
    importable, torch otherwise)."""
    # Transformer baseline only.
    rotary_base: int = 500000
    """RoPE base θ of the baseline, >= 2 (500000: Llama 3)."""
    init_method_std: float = 0.02
    """Standard deviation of the baseline's normal weight initialisation, > 0 (Megatron's
    ``init_method_std``; MM v2 follows Table 6 instead)."""

    def validate(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "ffn_hidden_size",
            "vocab_size",
            "seq_length",
            "make_vocab_size_divisible_by",
            "scan_chunk_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        if not self.norm_epsilon > 0:
            raise ConfigError(f"norm_epsilon: must be > 0, got {self.norm_epsilon}")
        if self.arch != "mm":
            if self.rotary_base < 2:
                raise ConfigError(f"rotary_base: must be >= 2, got {self.rotary_base}")
            if not self.init_method_std > 0:
                raise ConfigError(f"init_method_std: must be > 0, got {self.init_method_std}")
            return
        if self.scan_chunk_size < 2:
            raise ConfigError(
                f"scan_chunk_size: the key scan's chunks need >= 2 tokens, got "
                f"{self.scan_chunk_size}"
            )
        if self.scan_backend == "triton":
            from mm_megatron.ops.key_scan import triton_unavailable_reason

            reason = triton_unavailable_reason()
            if reason is not None:
                raise ConfigError(
                    f"scan_backend: 'triton' needs the triton package and a CUDA device, but "
                    f"{reason}; use 'auto' or 'torch'"
                )
        if self.short_window < 2:
            raise ConfigError(f"short_window: h must be >= 2, got {self.short_window}")
        if not 1 <= self.ltm_offset_min <= self.ltm_offset_max:
            raise ConfigError(
                f"ltm_offset_min: need 1 <= ltm_offset_min <= ltm_offset_max, got "
                f"{self.ltm_offset_min} and {self.ltm_offset_max}"
            )
        top = max_ltm_offset(self.stm_max_lag)
        if self.ltm_offset_max > top:
            raise ConfigError(
                f"ltm_offset_max: m ({self.ltm_offset_max}) must not exceed stm_max_lag + 1 "
                f"({top}; short_window for Eq. 10), or some pairs are in neither memory"
            )
        if not 1 <= self.ltm_offset_inference <= top:
            raise ConfigError(
                f"ltm_offset_inference: must be in [1, stm_max_lag + 1 = {top}] (short_window "
                f"for Eq. 10), got {self.ltm_offset_inference}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def memory_kinds(self) -> tuple[str, ...]:
        """The contextual memories of each MM v2 layer, in W_o input order."""
        return ("short", "long") if self.long_term_memory else ("short",)

    @property
    def stm_max_lag(self) -> int:
        """Largest lag p - j the short-term memory reads (Eq. 10: h - 1)."""
        return self.short_window - 1 if self.stm_span == "eq10" else self.short_window

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by.

        Unlike Megatron-LM, the padding does not depend on the TP size, so a checkpoint
        resumes under any layout; :func:`validate_layout` checks that TP divides it.
        """
        multiple = self.make_vocab_size_divisible_by
        padded = int(math.ceil(self.vocab_size / multiple) * multiple)
        if padded % tensor_parallel:
            raise ConfigError(
                f"model.make_vocab_size_divisible_by: the padded vocabulary ({padded}) is not "
                f"divisible by tensor_model_parallel_size {tensor_parallel}; use a multiple of it"
            )
        return padded


@dataclass
class ParallelConfig:
    """How the model is split over processes (``parallel:`` section)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size, >= 1: heads, FFN columns and vocabulary rows are split over this
    many ranks (it divides ``num_heads``, ``ffn_hidden_size`` and the padded vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages, >= 1: consecutive layers are split over this many ranks."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule, >= 1 (null or 1: no
    interleaving); > 1 needs ``pipeline_model_parallel_size`` >= 2 and a number of
    micro-batches that is a multiple of it."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism: the activations outside the tensor-parallel regions
    (norms, residual stream) are split along the sequence over the tensor-parallel ranks.
    Needs ``tensor_model_parallel_size`` >= 2 and ``seq_length`` a multiple of it."""

    def validate(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 1:
            raise ConfigError(f"virtual_pipeline_model_parallel_size: must be >= 1, got {vpp}")
        if vpp is not None and vpp > 1 and self.pipeline_model_parallel_size < 2:
            raise ConfigError(
                "virtual_pipeline_model_parallel_size: interleaving needs "
                "pipeline_model_parallel_size >= 2"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ConfigError("sequence_parallel: needs tensor_model_parallel_size >= 2")


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Check that the model can be split as asked; errors name the offending field."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if model.num_heads % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: model.num_heads {model.num_heads} is not "
            f"divisible by tensor_model_parallel_size {tp}"
        )
    if model.ffn_hidden_size % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: model.ffn_hidden_size {model.ffn_hidden_size} "
            f"is not divisible by tensor_model_parallel_size {tp}"
        )
    model.padded_vocab_size(tp)  # the vocabulary splits over TP ranks
    stages = pp * (parallel.virtual_pipeline_model_parallel_size or 1)
    if model.num_layers % stages:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size: model.num_layers {model.num_layers} is not "
            f"divisible by the {stages} pipeline stages (pipeline x virtual)"
        )
    if parallel.sequence_parallel and model.seq_length % tp:
        raise ConfigError(
            f"parallel.sequence_parallel: model.seq_length {model.seq_length} is not divisible "
            f"by tensor_model_parallel_size {tp}"
        )


def load_model_config(path: str, overrides: list[str] | None = None) -> ModelConfig:
    """The ``model:`` section of a YAML config file, validated (errors name file and key)."""
    from mm_megatron.config_loading import apply_overrides, from_mapping, load_yaml

    data = apply_overrides(load_yaml(path), overrides or [])
    if "model" not in data:
        raise ConfigError(f"{path}: no 'model' section")
    try:
        return from_mapping(ModelConfig, data["model"], "model")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
