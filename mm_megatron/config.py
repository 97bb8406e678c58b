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


@dataclass
class ModelConfig:
    """Architecture of one model (paper §3, §4 and App. C).

    ``num_heads`` is the head count *per memory type* for MM v2 (H short-term and H
    long-term heads, each of ``hidden_size / num_heads`` channels), and the attention head
    count for the transformer baseline.
    """

    arch: Arch
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int = 4096
    make_vocab_size_divisible_by: int = 128
    norm_epsilon: float = 1e-5
    backend: Backend = "auto"
    # Memory Mosaics v2 only.
    short_window: int = 256  # h: short-term memory sees pairs t-h+1 .. t-1 (Eq. 10)
    stm_span: Literal["eq10", "fig11"] = "eq10"  # fig11: pairs t-h .. t-1 (Fig. 11 vs Eq. 10)
    ltm_offset_min: int = 64  # m ~ U[ltm_offset_min, ltm_offset_max] in training
    ltm_offset_max: int = 256
    ltm_offset_inference: int = 64  # m at evaluation and inference
    long_term_memory: bool = True  # false: the paper's "without LTM" ablation
    scan_chunk_size: int = 64
    memory_backend: MemoryBackend = "auto"
    # key scan of Eq. 8: triton = fused kernels (CUDA), torch = chunked torch ops, auto = triton
    # on CUDA when the triton package is importable, torch otherwise
    scan_backend: ScanBackend = "auto"
    # Transformer baseline only.
    rotary_base: int = 500000
    init_method_std: float = 0.02

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size",
                     "seq_length", "make_vocab_size_divisible_by", "scan_chunk_size"):  # fmt: skip
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
            return
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
        if self.ltm_offset_max > self.short_window:
            raise ConfigError(
                f"ltm_offset_max: m ({self.ltm_offset_max}) must not exceed short_window "
                f"({self.short_window}), or pairs with lag between h and m are in neither memory"
            )
        if not 1 <= self.ltm_offset_inference <= self.short_window:
            raise ConfigError(
                f"ltm_offset_inference: must be in [1, short_window={self.short_window}], "
                f"got {self.ltm_offset_inference}"
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
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False

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
