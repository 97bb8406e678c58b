"""The transformer baseline ↔ Hugging Face's standard Llama format (``LlamaForCausalLM``).

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

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.convert.megatron_state import fit_vocab

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


def megatron_gpt_layer_to_llama(
    meg: dict[str, Tensor], cfg: ModelConfig, i: int
) -> dict[str, Tensor]:
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


def llama_to_megatron(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of :func:`megatron_gpt_to_llama`: ``LlamaForCausalLM`` state dict → full
    Megatron GPT state dict (vocabulary padded)."""
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": hf["lm_head.weight"],
    }
    for i in range(cfg.num_layers):
        out.update(llama_layer_to_megatron(hf, cfg, i))
    return fit_vocab({k: v.contiguous() for k, v in out.items()}, cfg, cfg.padded_vocab_size())


def llama_layer_to_megatron(hf: dict[str, Tensor], cfg: ModelConfig, i: int) -> dict[str, Tensor]:
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
            [hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]
        ),
        m + "mlp.linear_fc2.weight": hf[h + "mlp.down_proj.weight"],
    }
