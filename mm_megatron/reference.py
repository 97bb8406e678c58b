"""Plain single-device PyTorch reference of the MM v2 model, written to read like the paper.

No Megatron, no parallelism, literal kernels (a T-step loop for the keys, a dense masked
softmax for the memories). It defines what the Megatron-Core model must compute and is
tested against it on identical weights (see :mod:`mm_megatron.convert.mm_layout`).

Block (§3.3, Fig. 2 right; pre-norm RMSNorm as in the Llama baseline, §4):
    x ← x + W_o [STM(RMSNorm₁ x) ‖ LTM(RMSNorm₁ x)]
    x ← x + W₂(SiLU(W₁ RMSNorm₂ x) ⊙ W₃ RMSNorm₂ x)        (persistent memory)
followed by a final RMSNorm and an untied classifier W_c. No position encoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm_megatron.config import ModelConfig
from mm_megatron.init_rules import init_head_scalars_, table6_init_, table6_std
from mm_megatron.memory_math import (
    HEAD_SCALARS,
    associative_memory,
    default_doc_pos,
    memory_span,
)
from mm_megatron.ops.naive import gated_keys_naive, memory_attention_dense
from mm_megatron.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """The pre-norm of a block: :func:`rms_norm` with a learnable gain (1 at initialisation)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ReferenceMemory(nn.Module):
    """One contextual associative memory (short- or long-term) with its own extractors."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        d, H = cfg.hidden_size, cfg.num_heads
        self.num_heads, self.head_dim = H, cfg.head_dim
        self.W_phi = nn.Linear(d, d, bias=False)  # key extractor k̃ = W_φ x (Eq. 8)
        self.W_psi = nn.Linear(d, d, bias=False)  # value extractor ṽ = W_ψ x (Eq. 9)
        self.W_g = nn.Linear(d, H, bias=False)  # input gate g = exp(W_g x)
        self.W_lam = nn.Linear(d, H, bias=False)  # decay λ = exp(-|W_λ x|)
        std = table6_std(d, layer_index)
        for lin in (self.W_phi, self.W_psi, self.W_g, self.W_lam):
            table6_init_(lin.weight, std)
        for name in HEAD_SCALARS:  # β₀, β₁, α, γ (unconstrained), α_ψ; one per head
            setattr(self, name, nn.Parameter(torch.empty(H)))
        init_head_scalars_({name: getattr(self, name) for name in HEAD_SCALARS})

    def forward(self, z: torch.Tensor, doc_pos: torch.Tensor, span: object) -> torch.Tensor:
        B, T, _ = z.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, H*D] -> [B, H, T, D]
            return t.view(B, T, self.num_heads, -1).transpose(1, 2)

        y = associative_memory(
            k_tilde=heads(self.W_phi(z)),
            v_tilde=heads(self.W_psi(z)),
            log_gate=self.W_g(z).transpose(1, 2),
            decay_logit=self.W_lam(z).transpose(1, 2),
            scalars={name: getattr(self, name) for name in HEAD_SCALARS},
            doc_pos=doc_pos,
            span=span,
            key_scan=gated_keys_naive,
            read=memory_attention_dense,
        )
        return y.transpose(1, 2).reshape(B, T, -1)  # concatenate heads


class ReferenceBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.cfg = cfg
        self.norm1 = RMSNorm(d, cfg.norm_epsilon)
        self.memories = nn.ModuleDict(
            {k: ReferenceMemory(cfg, layer_index) for k in cfg.memory_kinds}
        )
        self.W_o = nn.Linear(len(cfg.memory_kinds) * d, d, bias=False)
        self.norm2 = RMSNorm(d, cfg.norm_epsilon)
        self.W1 = nn.Linear(d, f, bias=False)
        self.W3 = nn.Linear(d, f, bias=False)
        self.W2 = nn.Linear(f, d, bias=False)
        std_d = table6_std(d, layer_index)
        for lin in (self.W_o, self.W1, self.W3):
            table6_init_(lin.weight, std_d)  # W_o too uses d, not its fan-in 2d (Table 6)
        table6_init_(self.W2.weight, table6_std(f, layer_index))

    def forward(self, x: torch.Tensor, doc_pos: torch.Tensor, ltm_offset: int) -> torch.Tensor:
        z = self.norm1(x)
        ys = [
            mem(z, doc_pos, memory_span(kind, self.cfg.stm_max_lag, ltm_offset))
            for kind, mem in self.memories.items()
        ]
        x = x + self.W_o(torch.cat(ys, dim=-1))
        z = self.norm2(x)
        return x + self.W2(F.silu(self.W1(z)) * self.W3(z))


class ReferenceMMModel(nn.Module):
    """The whole MM v2 language model: embedding, N_b blocks, final norm, classifier W_c."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "mm":
            raise ValueError(f"ReferenceMMModel needs arch 'mm', got {cfg.arch!r}")
        self.cfg = cfg
        d, V = cfg.hidden_size, cfg.vocab_size
        self.embedding = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(ReferenceBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(d, cfg.norm_epsilon)
        self.W_c = nn.Linear(d, V, bias=False)  # untied (the parameter counts of Table 2)
        std = 1.0 / math.sqrt(2 * d)
        table6_init_(self.embedding.weight, std)
        table6_init_(self.W_c.weight, std)
        self.ltm_offset: int | None = None  # set per step in training; None = inference m

    def forward(self, tokens: torch.Tensor, doc_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` for tokens ``[B, T]``; doc_pos as in mm_megatron.ops.naive."""
        if doc_pos is None:
            doc_pos = default_doc_pos(*tokens.shape, device=tokens.device)
        m = self.ltm_offset if self.ltm_offset is not None else self.cfg.ltm_offset_inference
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, doc_pos, m)
        return self.W_c(self.final_norm(x))
