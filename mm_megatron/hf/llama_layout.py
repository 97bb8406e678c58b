"""The transformer baseline in Hugging Face's standard Llama format (``LlamaForCausalLM``).

Megatron's GPT baseline (``ModelConfig(arch="transformer")``: RMSNorm, SwiGLU, RoPE, no
biases, untied embeddings, ``num_query_groups = num_heads``) is a Llama model. Mapping of a
full (unsharded) Megatron state dict, per layer ``i``:

========================================================  =======================================
Megatron                                                   Llama
========================================================  =======================================
embedding.word_embeddings.weight [:V]                      model.embed_tokens.weight
decoder.layers.i.input_layernorm.weight                    model.layers.i.input_layernorm.weight
decoder.layers.i.self_attention.linear_qkv.weight          model.layers.i.self_attn.{q,k,v}_proj
  rows viewed [H, 3, d_h, d]: per head [q_h; k_h; v_h]       .weight (rows of head h: h·d_h..)
decoder.layers.i.self_attention.linear_proj.weight         model.layers.i.self_attn.o_proj.weight
decoder.layers.i.pre_mlp_layernorm.weight                  model.layers.i.post_attention_layernorm
decoder.layers.i.mlp.linear_fc1.weight = [W_gate; W_up]    model.layers.i.mlp.{gate,up}_proj.weight
decoder.layers.i.mlp.linear_fc2.weight                     model.layers.i.mlp.down_proj.weight
decoder.final_layernorm.weight                             model.norm.weight
output_layer.weight [:V]                                   lm_head.weight
========================================================  =======================================

RoPE: Megatron's default (``rotary_interleaved=False``) rotates the two halves of each head
vector, exactly HF Llama's ``rotate_half`` with the same inverse frequencies
``base^(-2i/d_h)``, so q and k rows need **no permutation** (the permutation in HF's
conversion script is for Meta's original checkpoints, which rotate interleaved pairs). The
test suite checks this against a Megatron ``GPTModel`` built in-process.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mm_megatron.config import ModelConfig

Tensor = torch.Tensor


def megatron_gpt_to_llama(meg: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Full Megatron GPT state dict → ``LlamaForCausalLM`` state dict (vocabulary unpadded)."""
    V = cfg.vocab_size
    out = {
        "model.embed_tokens.weight": meg["embedding.word_embeddings.weight"][:V],
        "model.norm.weight": meg["decoder.final_layernorm.weight"],
        "lm_head.weight": meg["output_layer.weight"][:V],
    }
    for i in range(cfg.num_layers):
        out.update(megatron_gpt_layer_to_llama(meg, cfg, i))
    return {k: v.contiguous().clone() for k, v in out.items()}


def megatron_gpt_layer_to_llama(meg: dict[str, Tensor], cfg: ModelConfig,
                                i: int) -> dict[str, Tensor]:  # fmt: skip
    """Layer ``i`` of :func:`megatron_gpt_to_llama` (results may be views of the input)."""
    H, dh, d, f = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.ffn_hidden_size
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {}
    qkv = meg[m + "self_attention.linear_qkv.weight"].view(H, 3, dh, d)
    for j, name in enumerate("qkv"):
        out[h + f"self_attn.{name}_proj.weight"] = qkv[:, j].reshape(H * dh, d)
    out[h + "self_attn.o_proj.weight"] = meg[m + "self_attention.linear_proj.weight"]
    out[h + "input_layernorm.weight"] = meg[m + "input_layernorm.weight"]
    out[h + "post_attention_layernorm.weight"] = meg[m + "pre_mlp_layernorm.weight"]
    fc1 = meg[m + "mlp.linear_fc1.weight"]
    out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = fc1[:f], fc1[f:]
    out[h + "mlp.down_proj.weight"] = meg[m + "mlp.linear_fc2.weight"]
    return out


def llama_layer_to_megatron(hf: dict[str, Tensor], cfg: ModelConfig,
                            i: int) -> dict[str, Tensor]:  # fmt: skip
    """Inverse of :func:`megatron_gpt_layer_to_llama`: layer ``i`` of a ``LlamaForCausalLM``
    state dict → Megatron GPT names."""
    H, dh, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    q, k, v = (hf[h + f"self_attn.{n}_proj.weight"].view(H, dh, d) for n in "qkv")
    return {
        m + "self_attention.linear_qkv.weight": torch.stack([q, k, v], 1).reshape(-1, d),
        m + "self_attention.linear_proj.weight": hf[h + "self_attn.o_proj.weight"],
        m + "input_layernorm.weight": hf[h + "input_layernorm.weight"],
        m + "pre_mlp_layernorm.weight": hf[h + "post_attention_layernorm.weight"],
        m + "mlp.linear_fc1.weight": torch.cat(
            [hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]),
        m + "mlp.linear_fc2.weight": hf[h + "mlp.down_proj.weight"],
    }


def llama_config_dict(cfg: ModelConfig, bos: int | None, eos: int | None) -> dict[str, Any]:
    """Keyword arguments of ``LlamaConfig`` for the baseline."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
    )


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
