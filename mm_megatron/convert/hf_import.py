"""Hugging Face → Megatron names: a directory written by the exporter (MM v2 or Llama), read
whole (:func:`read_hf_dir`) or lazily, one layer at a time (:class:`HFSource`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.convert.hf_config import expected_hf_shapes, hf_to_model_config
from mm_megatron.convert.hf_layout import (
    global_names,
    hf_to_megatron,
    hf_to_megatron_globals,
    hf_to_megatron_layer,
    layer_keys,
)
from mm_megatron.convert.outputs import ConversionError
from mm_megatron.convert.safetensors_io import LazySafetensors, SafetensorsStreamError

Tensor = torch.Tensor


class HFSource:
    """A Hugging Face directory from ``export_hf``, read lazily under Megatron names (the
    interface of :class:`~mm_megatron.convert.layer_reader.MegatronLayerReader`)."""

    def __init__(self, model_dir: str | Path, cfg: ModelConfig | None = None) -> None:
        self.path = Path(model_dir)
        config_file = self.path / "config.json"
        try:
            self.hf_config = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise ConversionError(f"{config_file}: cannot read ({err})") from None
        self.cfg = cfg or hf_to_model_config(self.hf_config, config_file)
        try:
            self.files = LazySafetensors(self.path)
        except SafetensorsStreamError as err:
            raise ConversionError(str(err)) from None
        expected = expected_hf_shapes(self.cfg)
        shapes = self.files.shapes
        wrong = sorted(set(expected) ^ set(shapes)) + sorted(
            f"{k} {shapes[k]} != {tuple(s)}"
            for k, s in expected.items()
            if k in shapes and shapes[k] != tuple(s)
        )
        if wrong:
            raise ConversionError(
                f"{self.path}: the weights do not match {config_file.name}: {wrong[:6]}"
            )
        self.rows = self.cfg.padded_vocab_size()

    def _get(self, names: list[str]) -> dict[str, Tensor]:
        try:
            return self.files.get(names)
        except SafetensorsStreamError as err:
            raise ConversionError(str(err)) from None

    def read_globals(self) -> dict[str, Tensor]:
        """Embedding, final norm and output layer under Megatron names (padded)."""
        names = global_names(self.cfg)
        return hf_to_megatron_globals(self._get(list(names.values())), self.cfg, self.rows)

    def read_layer(self, i: int) -> dict[str, Tensor]:
        """Layer ``i`` under Megatron names ``decoder.layers.{i}.*``."""
        layer = self._get(layer_keys(self.files.keys(), i))
        return {k: v.contiguous() for k, v in hf_to_megatron_layer(layer, self.cfg, i).items()}


def read_hf_dir(
    model_dir: str | Path, cfg: ModelConfig | None = None
) -> tuple[dict[str, Tensor], ModelConfig, dict[str, Any]]:
    """A Hugging Face directory from ``export_hf`` → (full Megatron state dict, model config,
    its ``config.json``). ``cfg`` replaces the config derived from ``config.json``."""
    source = HFSource(model_dir, cfg)
    full = hf_to_megatron(source._get(source.files.keys()), source.cfg)
    return {k: v.contiguous() for k, v in full.items()}, source.cfg, source.hf_config
