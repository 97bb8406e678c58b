"""Load a model to evaluate: a Hugging Face directory written by the exporter, or a Megatron
training checkpoint converted in memory (nothing written to disk).

Both give the Hugging Face classes the release ships: the MM v2 remote-code model
(:mod:`mm_megatron.hf.modeling_memory_mosaics`, in-package copy) or ``LlamaForCausalLM`` for
the transformer baseline, whose RoPE positions beyond the training length are simply
extrapolated (no scaling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class LoadedModel:
    """A model ready for evaluation and where it came from."""

    model: nn.Module
    arch: str  # "mm" or "transformer"
    source: str  # "hf" or "megatron"
    tokenizer_files: list[Path]
    train_length: int | None  # the training seq_length (config max_position_embeddings)


def _hf_class(model_type: str | None) -> Any:
    if model_type == "memory_mosaics":
        from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsForCausalLM

        return MemoryMosaicsForCausalLM
    if model_type == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM
    raise ValueError(f"model_type {model_type!r} is neither memory_mosaics nor llama")


def hf_from_megatron_state(state: dict[str, torch.Tensor], cfg: Any,
                           tokenizer_files: list[Path]) -> nn.Module:  # fmt: skip
    """The Hugging Face model (fp32, eval mode) of a full Megatron state dict, in memory, with
    the exporter's name mapping (:mod:`mm_megatron.hf.export`)."""
    from mm_megatron.hf.export import (
        _hf_config,
        reference_to_hf,
        release_tokenizer,
        untangle_fused_norms,
    )

    side = release_tokenizer([Path(p) for p in tokenizer_files], cfg, None, None, None, None)
    bos, eos = side.bos, side.eos
    meg = {k: v.float() for k, v in untangle_fused_norms(state).items()}
    if cfg.arch == "mm":
        from mm_megatron.weight_layout import megatron_to_reference

        tensors = reference_to_hf(megatron_to_reference(meg, cfg))
    else:
        from mm_megatron.hf.llama_layout import megatron_gpt_to_llama

        tensors = megatron_gpt_to_llama(meg, cfg)
    config = _hf_config(cfg, bos, eos, torch.float32)
    model = _hf_class(config.model_type)(config)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def load_model(path: str | Path, *, device: str = "cpu",
               model_config: str | None = None) -> LoadedModel:  # fmt: skip
    """Load ``path`` for evaluation (fp32, eval mode, on ``device``).

    ``path``: a Hugging Face directory (``config.json``) or a Megatron run root / ``iter_*``
    directory (converted in memory; ``model_config``, a YAML with a ``model:`` section,
    replaces the checkpoint's). Raises FileNotFoundError / ValueError with the path at fault.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    if (path / "config.json").is_file():
        from mm_megatron.checkpoint_io import tokenizer_files

        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        model = _hf_class(model_type).from_pretrained(path, dtype=torch.float32)
        arch, source, files = ("mm" if model_type == "memory_mosaics" else "transformer",
                               "hf", tokenizer_files(path))  # fmt: skip
    else:
        from mm_megatron.checkpoint_io import load_megatron_checkpoint
        from mm_megatron.config import load_model_config

        cfg = load_model_config(model_config) if model_config else None
        ckpt = load_megatron_checkpoint(path, cfg)
        model = hf_from_megatron_state(ckpt.state_dict, ckpt.cfg, ckpt.tokenizer_files)
        arch, source, files = ckpt.cfg.arch, "megatron", ckpt.tokenizer_files
    model = model.to(device).eval()
    length = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(model, arch, source, files, int(length) if length else None)
