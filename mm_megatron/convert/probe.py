"""The sampled parity probe of the streaming converters: the embeddings, the output layer and
the first and last layers, as a small model of its own.

Every layer goes through the same per-layer mapping, and the exact check of the streaming
converters proves each tensor went through it unchanged, so the probe's logits prove the
mapping of all layers at the memory cost of a few.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.convert.hf_config import hf_config
from mm_megatron.convert.hf_layout import LAYER, layer_keys, rename
from mm_megatron.convert.safetensors_io import LazySafetensors
from mm_megatron.convert.safetensors_io import ShardedSafetensorsWriter as Writer

PARITY_MODES = ("sample", "full", "none")


def check_parity_mode(parity: str) -> None:
    """Refuse a ``parity`` that is not one of :data:`PARITY_MODES`."""
    if parity not in PARITY_MODES:
        raise ValueError(f"parity must be one of {PARITY_MODES}, not {parity!r}")


def probe_layers(num_layers: int) -> list[int]:
    """The layers of the sampled parity probe: the first and the last."""
    return sorted({0, num_layers - 1})


def parity_label(parity: str, cfg: ModelConfig) -> str:
    """What a parity figure covered, for the report."""
    if parity == "full":
        return "full model"
    layers = probe_layers(cfg.num_layers)
    return (
        f"sampled: layers {', '.join(map(str, layers))} of {cfg.num_layers}, embedding "
        "and output layer; --parity full for the whole model"
    )


def write_probe(
    source: LazySafetensors,
    out: Path,
    cfg: ModelConfig,
    layers: list[int],
    ids: tuple[int | None, int | None],
) -> ModelConfig:
    """A HF directory of the probe model (``layers`` of ``source``, renumbered from 0)."""
    probe = dataclasses.replace(cfg, num_layers=len(layers))
    out.mkdir()
    hf_config(probe, *ids, torch.float32).to_json_file(str(out / "config.json"))
    index = {j: n for n, j in enumerate(layers)}
    names = [k for k in source.keys() if not LAYER.match(k)]
    names += [k for j in layers for k in layer_keys(source.keys(), j)]
    entries = [(rename(k, index), source.shapes[k], source[k].dtype) for k in names]
    writer = Writer(out, entries, 0, single_file="model.safetensors")
    for k in names:
        writer.write(rename(k, index), source[k])
    writer.close()
    return probe
