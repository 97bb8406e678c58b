"""Parameter counts and FLOPs per token of MM v2 and the transformer baseline (paper Table 2).

Two FLOP conventions:

* ``paper``: the one the paper's Table 2 figures follow (Kaplan et al.'s forward count, used
  by Casson): 2·N_non-embedding + 2·d·V for the classifier + 2·L·n_ctx·d per attention-like
  memory (MM v2 has two per layer, the transformer one). It reproduces 18.9B (MM v2),
  16.7B (transformer) and 15.6B (MM v2 without LTM) at n_ctx = 256 for the large models.
* ``training``: what a training step really costs, for throughput and MFU: 3 x forward, the
  forward counting every matmul (2 FLOPs per multiply-add), the memories at the number of
  pairs each query actually reads (window h for STM, offset m for LTM, causal halving for
  attention), and the chunked key scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.memory_math import memory_span
from mm_megatron.ops.naive import visible_pairs


@dataclass(frozen=True)
class ParamCount:
    embedding: int  # input embedding W_e
    classifier: int  # output classifier W_c (untied)
    per_layer: int
    layers: int
    final_norm: int

    @property
    def total(self) -> int:
        return self.embedding + self.classifier + self.layers + self.final_norm

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.classifier


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one block (unpadded, as in the paper's totals)."""
    d, f, H = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_heads
    mlp = 3 * d * f  # SwiGLU W₁, W₃, W₂ (persistent memory)
    norms = 2 * d
    if cfg.arch == "transformer":
        return 4 * d * d + mlp + norms  # W_q, W_k, W_v, W_o (MHA)
    M = len(cfg.memory_kinds)
    extractors = M * (2 * d * d + 2 * d * H)  # W_φ, W_ψ (d×d); W_g, W_λ (d×H) per memory
    w_o = M * d * d  # d × (M·d)
    scalars = 5 * H * M  # β₀, β₁, α, γ, α_ψ per head and memory
    return extractors + w_o + scalars + mlp + norms


def count_params(cfg: ModelConfig) -> ParamCount:
    per_layer = layer_params(cfg)
    emb = cfg.vocab_size * cfg.hidden_size
    return ParamCount(emb, emb, per_layer, per_layer * cfg.num_layers, cfg.hidden_size)


def memories_per_layer(cfg: ModelConfig) -> int:
    return 1 if cfg.arch == "transformer" else len(cfg.memory_kinds)


def paper_flops_per_token(cfg: ModelConfig, n_ctx: int) -> float:
    """Forward FLOPs per token in the paper's convention (see module docstring)."""
    params = count_params(cfg)
    attention = 2 * cfg.num_layers * n_ctx * cfg.hidden_size * memories_per_layer(cfg)
    return 2 * params.non_embedding + 2 * cfg.hidden_size * cfg.vocab_size + attention


def _mean_pairs(seq_len: int, min_lag: int, max_lag: int | None) -> float:
    """Average number of pairs a query reads in a document of ``seq_len`` tokens: the n of
    Eq. 6 as the model counts it (:func:`~mm_megatron.ops.naive.visible_pairs`)."""
    doc_pos = torch.arange(seq_len).unsqueeze(0)
    return int(visible_pairs(doc_pos, min_lag, max_lag).sum()) / seq_len


def training_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """FLOPs per token of one training step (forward + backward = 3 x forward).

    Documents are taken to fill the sequence; the LTM offset is the mean of the training
    range. Matmul parameters exclude norms and per-head scalars.
    """
    T = seq_len or cfg.seq_length
    d, f, L, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.vocab_size
    mlp = 2 * 3 * d * f
    if cfg.arch == "transformer":
        per_layer = 2 * 4 * d * d + mlp + 4 * d * _mean_pairs(T, 0, None)
    else:
        M, H = len(cfg.memory_kinds), cfg.num_heads
        per_layer = 2 * M * (2 * d * d + 2 * d * H) + 2 * M * d * d + mlp
        m = (cfg.ltm_offset_min + cfg.ltm_offset_max) / 2
        for kind in cfg.memory_kinds:
            span = memory_span(kind, cfg.stm_max_lag, round(m))
            per_layer += 4 * d * _mean_pairs(T, span.min_lag, span.max_lag)  # q·k, p·v
            per_layer += 2 * d * min(cfg.scan_chunk_size, T)  # chunked key scan
    return 3 * (L * per_layer + 2 * d * V)
