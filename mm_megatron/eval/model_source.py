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

from mm_megatron.checkpoint.format import tokenizer_files
from mm_megatron.convert.hf_config import hf_config
from mm_megatron.convert.parity import hf_model_class


@dataclass
class LoadedModel:
    """A model ready for evaluation and where it came from."""

    model: nn.Module
    arch: str  # "mm" or "transformer"
    source: str  # "hf" or "megatron"
    tokenizer_files: list[Path]
    train_length: int | None  # the training seq_length (config max_position_embeddings)


def hf_from_megatron_state(
    state: dict[str, torch.Tensor], cfg: Any, tokenizer_files: list[Path]
) -> nn.Module:
    """The Hugging Face model (fp32, eval mode) of a full Megatron state dict, in memory, with
    the exporter's name mapping (:mod:`mm_megatron.convert.hf_layout`)."""
    from mm_megatron.convert.hf_export import release_tokenizer
    from mm_megatron.convert.hf_layout import megatron_to_hf
    from mm_megatron.convert.megatron_state import untangle_fused_norms

    side = release_tokenizer([Path(p) for p in tokenizer_files], cfg, None, None, None, None)
    bos, eos = side.bos, side.eos
    meg = {k: v.float() for k, v in untangle_fused_norms(state).items()}
    tensors = megatron_to_hf(meg, cfg)
    config = hf_config(cfg, bos, eos, torch.float32)
    model = hf_model_class(config.model_type)(config)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def load_model(
    path: str | Path, *, device: str = "cpu", model_config: str | None = None
) -> LoadedModel:
    """Load ``path`` for evaluation (fp32, eval mode, on ``device``).

    ``path``: a Hugging Face directory (``config.json``) or a Megatron run root / ``iter_*``
    directory (converted in memory; ``model_config``, a YAML with a ``model:`` section,
    replaces the checkpoint's). Raises FileNotFoundError / ValueError with the path at fault.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    if (path / "config.json").is_file():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        model = hf_model_class(model_type).from_pretrained(path, dtype=torch.float32)
        arch, source, files = (
            "mm" if model_type == "memory_mosaics" else "transformer",
            "hf",
            tokenizer_files(path),
        )
    else:
        from mm_megatron.config import load_model_config
        from mm_megatron.convert.megatron_io import load_megatron_checkpoint

        cfg = load_model_config(model_config) if model_config else None
        ckpt = load_megatron_checkpoint(path, cfg)
        model = hf_from_megatron_state(ckpt.state_dict, ckpt.cfg, ckpt.tokenizer_files)
        arch, source, files = ckpt.cfg.arch, "megatron", ckpt.tokenizer_files
    model = model.to(device).eval()
    length = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(model, arch, source, files, int(length) if length else None)
