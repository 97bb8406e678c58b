"""MM v2 weight layouts, both directions: Megatron-Core ↔ the paper's ↔ Hugging Face names.

The paper's layout (:class:`mm_megatron.reference.ReferenceMMModel`) keeps one matrix per
symbol: W_φ, W_ψ (d×d), W_g, W_λ (H×d) per memory, W_o (d×2d) with input columns
[STM heads ‖ LTM heads], W₁, W₃, W₂, unpadded vocabulary. The Megatron layout (a full,
unsharded ``GPTModel`` state dict, TP=1 and PP=1) fuses them head-major so tensor
parallelism can split heads contiguously (see :mod:`mm_megatron.layers.memories`) and pads the
vocabulary. Both directions are exact (pure indexing), so a round trip is the identity.

The Hugging Face model (:mod:`mm_megatron.hf.modeling_memory_mosaics`) keeps the paper's
names under ``model.``, except the classifier: ``W_c.weight`` ↔ ``lm_head.weight``.
"""

from __future__ import annotations

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.memory_math import HEAD_SCALARS

Tensor = torch.Tensor


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def reference_to_megatron(
    ref: dict[str, Tensor], cfg: ModelConfig, padded_vocab: int | None = None
) -> dict[str, Tensor]:
    """Reference state dict → full Megatron ``GPTModel`` state dict (no ``_extra_state``)."""
    vocab = padded_vocab or cfg.padded_vocab_size()
    out = {
        "embedding.word_embeddings.weight": _pad_rows(ref["embedding.weight"], vocab),
        "decoder.final_layernorm.weight": ref["final_norm.weight"],
        "output_layer.weight": _pad_rows(ref["W_c.weight"], vocab),
    }
    for i in range(cfg.num_layers):
        out.update(reference_layer_to_megatron(ref, cfg, i))
    return out


def reference_layer_to_megatron(
    ref: dict[str, Tensor], cfg: ModelConfig, i: int
) -> dict[str, Tensor]:
    """Layer ``i`` of :func:`reference_to_megatron` (reads only ``blocks.{i}.*``)."""
    H, dh, kinds = cfg.num_heads, cfg.head_dim, cfg.memory_kinds
    r, m = f"blocks.{i}.", f"decoder.layers.{i}."
    out = {}
    rows, cols = [], []
    for h in range(H):
        heads = slice(h * dh, (h + 1) * dh)
        for k, kind in enumerate(kinds):
            mem = f"{r}memories.{kind}."
            rows += [
                ref[mem + "W_phi.weight"][heads],
                ref[mem + "W_psi.weight"][heads],
                ref[mem + "W_g.weight"][h : h + 1],
                ref[mem + "W_lam.weight"][h : h + 1],
            ]
            offset = k * cfg.hidden_size
            cols.append(ref[r + "W_o.weight"][:, offset + h * dh : offset + (h + 1) * dh])
    out[m + "self_attention.linear_in.weight"] = torch.cat(rows)
    out[m + "self_attention.linear_out.weight"] = torch.cat(cols, dim=1)
    for name in HEAD_SCALARS:
        out[m + f"self_attention.{name}"] = torch.stack(
            [ref[f"{r}memories.{kind}.{name}"] for kind in kinds], dim=1
        )
    out[m + "input_layernorm.weight"] = ref[r + "norm1.weight"]
    out[m + "pre_mlp_layernorm.weight"] = ref[r + "norm2.weight"]
    out[m + "mlp.linear_fc1.weight"] = torch.cat([ref[r + "W1.weight"], ref[r + "W3.weight"]])
    out[m + "mlp.linear_fc2.weight"] = ref[r + "W2.weight"]
    return out


def megatron_to_reference(meg: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Full Megatron state dict → reference state dict (vocabulary padding stripped)."""
    V = cfg.vocab_size
    out = {
        "embedding.weight": meg["embedding.word_embeddings.weight"][:V],
        "final_norm.weight": meg["decoder.final_layernorm.weight"],
        "W_c.weight": meg["output_layer.weight"][:V],
    }
    for i in range(cfg.num_layers):
        out.update(megatron_layer_to_reference(meg, cfg, i))
    return {k: v.clone() for k, v in out.items()}


def megatron_layer_to_reference(
    meg: dict[str, Tensor], cfg: ModelConfig, i: int
) -> dict[str, Tensor]:
    """Layer ``i`` of :func:`megatron_to_reference` (reads only ``decoder.layers.{i}.*``;
    the results may be views of the input)."""
    H, dh, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    f, kinds = cfg.ffn_hidden_size, cfg.memory_kinds
    width = 2 * dh + 2
    r, m = f"blocks.{i}.", f"decoder.layers.{i}."
    out = {}
    w_in = meg[m + "self_attention.linear_in.weight"].view(H, len(kinds), width, d)
    w_out = meg[m + "self_attention.linear_out.weight"].view(d, H, len(kinds), dh)
    for k, kind in enumerate(kinds):
        mem = f"{r}memories.{kind}."
        out[mem + "W_phi.weight"] = w_in[:, k, :dh].reshape(H * dh, d)
        out[mem + "W_psi.weight"] = w_in[:, k, dh : 2 * dh].reshape(H * dh, d)
        out[mem + "W_g.weight"] = w_in[:, k, 2 * dh]
        out[mem + "W_lam.weight"] = w_in[:, k, 2 * dh + 1]
        for name in HEAD_SCALARS:
            out[mem + name] = meg[m + f"self_attention.{name}"][:, k]
    out[r + "W_o.weight"] = w_out.permute(0, 2, 1, 3).reshape(d, len(kinds) * H * dh)
    out[r + "norm1.weight"] = meg[m + "input_layernorm.weight"]
    out[r + "norm2.weight"] = meg[m + "pre_mlp_layernorm.weight"]
    fc1 = meg[m + "mlp.linear_fc1.weight"]
    out[r + "W1.weight"], out[r + "W3.weight"] = fc1[:f], fc1[f:]
    out[r + "W2.weight"] = meg[m + "mlp.linear_fc2.weight"]
    return out


def reference_to_hf(ref: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reference-layout names → names of ``MemoryMosaicsForCausalLM``."""
    return {("lm_head.weight" if k == "W_c.weight" else f"model.{k}"): v for k, v in ref.items()}


def hf_to_reference(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`reference_to_hf`."""
    return {
        ("W_c.weight" if k == "lm_head.weight" else k.removeprefix("model.")): v
        for k, v in hf.items()
    }
