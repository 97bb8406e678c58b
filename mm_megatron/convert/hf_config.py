"""``ModelConfig`` ↔ Hugging Face ``config.json``, both directions, and the HF model's shapes.

MM v2 maps to ``MemoryMosaicsConfig`` (:mod:`mm_megatron.hf.configuration_memory_mosaics`),
the transformer baseline to ``LlamaConfig``. Training-only fields have no HF counterpart; the
way back gives them defaults (ltm_offset_min = inference m, ltm_offset_max = h).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mm_megatron.config import ModelConfig
from mm_megatron.config_loading import ConfigError
from mm_megatron.convert.outputs import ConversionError
from mm_megatron.hf.configuration_memory_mosaics import MemoryMosaicsConfig
from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsForCausalLM

AUTO_MAP = {
    "AutoConfig": "configuration_memory_mosaics.MemoryMosaicsConfig",
    "AutoModel": "modeling_memory_mosaics.MemoryMosaicsModel",
    "AutoModelForCausalLM": "modeling_memory_mosaics.MemoryMosaicsForCausalLM",
}


def mm_config_dict(
    cfg: ModelConfig, bos: int | None, eos: int | None, pad: int | None = None
) -> dict:
    """Keyword arguments of ``MemoryMosaicsConfig`` for a model config."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_hidden_size,
        short_window=cfg.short_window,
        stm_max_lag=cfg.stm_max_lag,
        ltm_offset=cfg.ltm_offset_inference,
        long_term_memory=cfg.long_term_memory,
        rms_norm_eps=cfg.norm_epsilon,
        max_position_embeddings=cfg.seq_length,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


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


def hf_config(
    cfg: ModelConfig, bos: int | None, eos: int | None, dtype: torch.dtype, pad: int | None = None
) -> Any:
    """The HF config object of an export (written as its ``config.json``)."""
    if cfg.arch == "mm":
        config = MemoryMosaicsConfig(**mm_config_dict(cfg, bos, eos, pad))
        config.auto_map = dict(AUTO_MAP)
        config.architectures = ["MemoryMosaicsForCausalLM"]
    else:
        config = LlamaConfig(**llama_config_dict(cfg, bos, eos))
        config.rope_theta = float(cfg.rotary_base)  # transformers 4.x reads only this field
        config.architectures = ["LlamaForCausalLM"]
        config.pad_token_id = pad
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """HF tensor names → shapes of the model ``cfg`` describes (built on the meta device)."""
    cls = MemoryMosaicsForCausalLM if cfg.arch == "mm" else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(hf_config(cfg, None, None, torch.float32))
    return {k: v.shape for k, v in model.state_dict().items()}


def hf_to_model_config(hf: dict[str, Any], where: Path) -> ModelConfig:
    """The ``ModelConfig`` of an exported ``config.json`` (training-only fields get defaults:
    ltm_offset_min = inference m, ltm_offset_max = h)."""
    kind = hf.get("model_type")
    if kind not in ("memory_mosaics", "llama"):
        raise ConversionError(f"{where}: model_type {kind!r} is not memory_mosaics or llama")
    common = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        ffn_hidden_size=hf["intermediate_size"],
        norm_epsilon=hf["rms_norm_eps"],
        seq_length=hf["max_position_embeddings"],
    )
    if kind == "memory_mosaics":
        h, lag, m = hf["short_window"], hf["stm_max_lag"], hf["ltm_offset"]
        spans = {h - 1: "eq10", h: "fig11"}
        if lag not in spans:
            raise ConversionError(f"{where}: stm_max_lag {lag} is neither h-1 nor h (h={h})")
        cfg = ModelConfig(
            arch="mm",
            num_heads=hf["num_heads"],
            short_window=h,
            stm_span=spans[lag],
            ltm_offset_inference=m,
            ltm_offset_min=m,
            ltm_offset_max=h,
            long_term_memory=hf["long_term_memory"],
            **common,
        )
    else:
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        unsupported = {
            "num_key_value_heads": hf.get("num_key_value_heads", heads) != heads,
            "attention_bias": hf.get("attention_bias", False),
            "mlp_bias": hf.get("mlp_bias", False),
            "tie_word_embeddings": hf.get("tie_word_embeddings", False),
            "rope_type": rope.get("rope_type", "default") != "default",
            "head_dim": hf.get("head_dim", hf["hidden_size"] // heads)
            != hf["hidden_size"] // heads,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConversionError(f"{where}: not the transformer baseline's layout ({bad})")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        cfg = ModelConfig(arch="transformer", num_heads=heads, rotary_base=int(theta), **common)
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConversionError(f"{where}: {err}") from None
    return cfg
