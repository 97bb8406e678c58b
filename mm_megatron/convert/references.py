"""Independent references of the parity checks: logits computed without the HF code.

MM v2: the paper's plain reference model (:class:`mm_megatron.reference.ReferenceMMModel`);
the transformer baseline: its forward pass written directly from Megatron's fused weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mm_megatron.config import ModelConfig
from mm_megatron.reference import ReferenceMMModel

Tensor = torch.Tensor
Reference = Callable[[Tensor], Tensor]


def mm_reference(ref_state: dict[str, Tensor], cfg: ModelConfig, device: str = "cpu") -> Reference:
    """The plain reference model on these weights (fp32, inference m) as a logits function."""
    with torch.device("meta"):
        model = ReferenceMMModel(cfg)
    model.load_state_dict({k: v.float() for k, v in ref_state.items()}, assign=True)
    model = model.to(device).eval()
    return lambda tokens: model(tokens.to(device)).float()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def megatron_gpt_logits(meg: dict[str, Tensor], cfg: ModelConfig, tokens: Tensor) -> Tensor:
    """Logits ``[B, T, V]`` of the Megatron GPT baseline, computed directly from its fused
    weights in plain PyTorch (fp32, causal, non-interleaved RoPE). Independent of the HF code,
    it is the default reference of the Llama export's parity check."""
    H, dh, f, V = cfg.num_heads, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    eps = cfg.norm_epsilon

    def norm(x: Tensor, w: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()

    def w(name: str) -> Tensor:
        return meg[name].float()

    B, T = tokens.shape
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().float(), angles.sin().float()
    x = F.embedding(tokens, w("embedding.word_embeddings.weight"))
    for i in range(cfg.num_layers):
        m = f"decoder.layers.{i}."
        z = norm(x, w(m + "input_layernorm.weight"))
        qkv = (z @ w(m + "self_attention.linear_qkv.weight").T).view(B, T, H, 3, dh)
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))  # [B, H, T, dh]
        q, k = (t * cos + _rotate_half(t) * sin for t in (q, k))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, -math.inf).softmax(-1)
        att = (probs @ v).transpose(1, 2).reshape(B, T, H * dh)
        x = x + att @ w(m + "self_attention.linear_proj.weight").T
        z = norm(x, w(m + "pre_mlp_layernorm.weight"))
        gate, up = (z @ w(m + "mlp.linear_fc1.weight").T).split(f, dim=-1)
        x = x + (F.silu(gate) * up) @ w(m + "mlp.linear_fc2.weight").T
    x = norm(x, w("decoder.final_layernorm.weight"))
    return (x @ w("output_layer.weight").T)[..., :V]
