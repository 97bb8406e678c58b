"""Megatron ↔ Hugging Face names for either architecture, whole state dicts or one layer at a
time (the streaming converters' unit). MM v2 goes through the paper's layout
(:mod:`mm_megatron.convert.mm_layout`), the baseline through Llama's
(:mod:`mm_megatron.convert.llama_layout`)."""

from __future__ import annotations

import re

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.convert import llama_layout, mm_layout
from mm_megatron.convert.megatron_state import VOCAB_KEYS, fit_vocab

Tensor = torch.Tensor
LAYER = re.compile(r"^(decoder\.layers\.|model\.layers\.|model\.blocks\.|blocks\.)(\d+)\.")
_MM_GLOBALS = {
    "embedding.word_embeddings.weight": "model.embedding.weight",
    "decoder.final_layernorm.weight": "model.final_norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LLAMA_GLOBALS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def global_names(cfg: ModelConfig) -> dict[str, str]:
    """Megatron → HF names of the embedding, final norm and output layer."""
    return _MM_GLOBALS if cfg.arch == "mm" else _LLAMA_GLOBALS


def megatron_to_hf(meg: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A full Megatron state dict (local-spec names) → HF state dict (vocabulary unpadded)."""
    if cfg.arch == "mm":
        return mm_layout.reference_to_hf(mm_layout.megatron_to_reference(meg, cfg))
    return llama_layout.megatron_gpt_to_llama(meg, cfg)


def hf_to_megatron(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of :func:`megatron_to_hf` (vocabulary padded)."""
    if cfg.arch == "mm":
        return mm_layout.reference_to_megatron(mm_layout.hf_to_reference(hf), cfg)
    return llama_layout.llama_to_megatron(hf, cfg)


def megatron_to_hf_globals(meg: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Embedding, final norm, output layer → HF names (vocabulary padding cut), in the order
    of :func:`megatron_to_hf`."""
    names = global_names(cfg)
    return {names[k]: (meg[k][: cfg.vocab_size] if k in VOCAB_KEYS else meg[k]) for k in names}


def megatron_to_hf_layer(meg: dict[str, Tensor], cfg: ModelConfig, i: int) -> dict[str, Tensor]:
    """Layer ``i`` (Megatron names) → HF names."""
    if cfg.arch == "mm":
        return mm_layout.reference_to_hf(mm_layout.megatron_layer_to_reference(meg, cfg, i))
    return llama_layout.megatron_gpt_layer_to_llama(meg, cfg, i)


def hf_to_megatron_globals(hf: dict[str, Tensor], cfg: ModelConfig, rows: int) -> dict[str, Tensor]:
    """HF embedding, final norm, output layer → Megatron names, ``rows`` vocabulary rows."""
    return fit_vocab({k: hf[v] for k, v in global_names(cfg).items()}, cfg, rows)


def hf_to_megatron_layer(hf: dict[str, Tensor], cfg: ModelConfig, i: int) -> dict[str, Tensor]:
    """Layer ``i`` (HF names) → Megatron names."""
    if cfg.arch == "mm":
        return mm_layout.reference_layer_to_megatron(
            {k.removeprefix("model."): v for k, v in hf.items()}, cfg, i
        )
    return llama_layout.llama_layer_to_megatron(hf, cfg, i)


def renumber(tensors: dict[str, Tensor], index: dict[int, int]) -> dict[str, Tensor]:
    """Rename ``...layers.{i}.`` / ``blocks.{i}.`` to ``index[i]`` (drop layers not in it)."""
    out = {}
    for key, value in tensors.items():
        match = LAYER.match(key)
        if match is None:
            out[key] = value
        elif int(match.group(2)) in index:
            out[f"{match.group(1)}{index[int(match.group(2))]}.{key[match.end() :]}"] = value
    return out


def rename(key: str, index: dict[int, int]) -> str:
    """One name through :func:`renumber`."""
    return next(iter(renumber({key: torch.empty(0)}, index)))


def layer_keys(names: list[str], i: int) -> list[str]:
    """The names of layer ``i``."""
    return [k for k in names if (m := LAYER.match(k)) and int(m.group(2)) == i]
