"""Names and vocabulary padding of a full (TP=1, PP=1) Megatron state dict."""

from __future__ import annotations

import torch

from mm_megatron.config import ModelConfig

Tensor = torch.Tensor
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def fit_vocab(state_dict: dict[str, Tensor], cfg: ModelConfig, rows: int) -> dict[str, Tensor]:
    """The vocabulary tensors cut or zero-padded to ``rows`` rows (real rows always kept)."""
    if rows < cfg.vocab_size:
        raise ValueError(f"{rows} vocabulary rows cannot hold vocab_size {cfg.vocab_size}")
    out = dict(state_dict)
    for key in VOCAB_KEYS:
        t = state_dict[key][:rows]
        if t.shape[0] < rows:
            t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
        out[key] = t
    return out


def is_megatron_layout(state_dict: dict[str, Tensor]) -> bool:
    """Whether a state dict has Megatron's names (rather than the reference layout's)."""
    return VOCAB_KEYS[0] in state_dict


def untangle_fused_norms(meg: dict[str, Tensor]) -> dict[str, Tensor]:
    """Transformer Engine layer specs fuse the pre-norms into the next linear layer
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``): rename them to the
    local spec's ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``."""
    fused = {
        "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    }
    out = {}
    for key, value in meg.items():
        if key.endswith("_extra_state"):
            continue
        for old, new in fused.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out
