"""Read a Megatron checkpoint one layer at a time, on CPU, without building the model.

Our torch_dist checkpoints store every per-layer parameter under one key with a leading
layer axis (``decoder.layers.mlp.linear_fc1.weight``: ``[L, 2f, d]``), split into chunks by
the TP/PP layout that saved them. :class:`MegatronLayerReader` reads the slice of one layer
(or one whole non-layer tensor) through ``torch.distributed.checkpoint``'s file reader: only
the chunks that overlap the slice are read, whatever the saving layout. Peak memory is one
layer (plus one saved chunk), not the model. No process group is needed.

The checkpoint is checked like :func:`mm_megatron.convert.megatron_io.load_megatron_checkpoint`
does: manifest, readable ``.metadata`` and ``common.pt``, every tensor of the model config
present with the right shape, finite values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mm_megatron.checkpoint import format as fmt
from mm_megatron.config import ModelConfig
from mm_megatron.convert.hf_config import expected_hf_shapes
from mm_megatron.convert.hf_layout import hf_to_megatron
from mm_megatron.convert.megatron_io import first_line, read_run_config, resolve_checkpoint_dir
from mm_megatron.convert.megatron_state import VOCAB_KEYS
from mm_megatron.convert.outputs import ConversionError

Tensor = torch.Tensor
LAYER_PREFIX = "decoder.layers."
# Megatron's local GPT layer spec saves the pre-norms under Transformer Engine's fused names
# (its ``sharded_state_dict_keys_map``), so that TE and local checkpoints are interchangeable.
KEY_ALIASES = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def expected_megatron_shapes(
    cfg: ModelConfig, vocab_rows: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Full Megatron names → shapes of the model ``cfg`` describes, computed on the meta
    device through the HF layout (the vocabulary has ``vocab_rows`` rows, default: padded)."""
    hf = {k: torch.empty(s, device="meta") for k, s in expected_hf_shapes(cfg).items()}
    meg = hf_to_megatron(hf, cfg)
    shapes = {k: tuple(v.shape) for k, v in meg.items()}
    if vocab_rows is not None:
        for key in VOCAB_KEYS:
            shapes[key] = (vocab_rows, *shapes[key][1:])
    return shapes


def layer_names(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The per-layer parameter names (``self_attention.linear_in.weight``, ...) in order."""
    first = f"{LAYER_PREFIX}0."
    return [k[len(first) :] for k in shapes if k.startswith(first)]


class _SliceLoader:
    """The part of torch DCP's ``LoadPlanner`` that ``FileSystemReader.read_data`` calls:
    every read item lands in its destination tensor."""

    def __init__(self, targets: dict[str, Tensor]) -> None:
        self.targets = targets

    def resolve_tensor(self, item: Any) -> Tensor:
        target = self.targets[item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths, strict=True)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, item: Any, tensor: Tensor) -> None:
        """Nothing to do: the reader copied into the view from :meth:`resolve_tensor`."""

    def load_bytes(self, item: Any, value: Any) -> None:
        raise ConversionError(f"{item.dest_index.fqn}: not a tensor")


class MegatronLayerReader:
    """A run root (the tracker's iteration) or an ``iter_*`` directory, read lazily.

    ``cfg`` replaces the checkpoint's ``config.yaml`` model section; tokenizer files come
    from ``<root>/tokenizer/`` unless ``tokenizer`` is given. :meth:`read_globals` returns the
    embedding, final norm and output layer; :meth:`read_layer` one layer under its full names
    (``decoder.layers.{i}.*``).
    """

    def __init__(
        self, path: str | Path, cfg: ModelConfig | None = None, tokenizer: str | Path | None = None
    ) -> None:
        self.path = resolve_checkpoint_dir(path)
        run_cfg, self.config = read_run_config(self.path)
        self.cfg = cfg or run_cfg
        manifest = fmt.read_manifest(self.path)
        self.iteration = int(manifest.get("iteration", 0))
        self.layout: dict[str, int] = manifest.get("layout", {})
        self.tokenizer_files = fmt.tokenizer_files(tokenizer or fmt.run_tokenizer_dir(self.path))
        try:
            self.reader = FileSystemReader(str(self.path))
            self.metadata = self.reader.read_metadata()
            self.reader.set_up_storage_reader(self.metadata, True)
        except Exception as err:  # noqa: BLE001 - any reader error means a damaged file
            raise ConversionError(
                f"{self.path / fmt.DIST_METADATA}: unreadable ({first_line(err)})"
            ) from err
        try:
            dist_checkpointing.load_common_state_dict(str(self.path))
        except Exception as err:  # noqa: BLE001
            raise ConversionError(
                f"{self.path / fmt.COMMON_STATE}: unreadable ({first_line(err)})"
            ) from err
        self.stored = self.metadata.state_dict_metadata
        embed = self.stored.get(VOCAB_KEYS[0])
        if embed is None or not hasattr(embed, "chunks"):
            raise ConversionError(f"{self.path}: no {VOCAB_KEYS[0]} in the checkpoint")
        self.vocab_rows = max(embed.size[0], self.cfg.vocab_size)
        self.shapes = expected_megatron_shapes(self.cfg, self.vocab_rows)
        self.layer_names = layer_names(self.shapes)
        self.global_names = [k for k in self.shapes if not k.startswith(LAYER_PREFIX)]
        self._check_shapes()

    def _stored_key(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The checkpoint key of a full name and its expected global shape."""
        if not name.startswith(LAYER_PREFIX):
            return name, self.shapes[name]
        local = name[len(LAYER_PREFIX) :].split(".", 1)[1]
        key = LAYER_PREFIX + local
        for plain, fused in KEY_ALIASES.items():
            alias = LAYER_PREFIX + fused + local.removeprefix(plain)
            if local.startswith(plain) and key not in self.stored and alias in self.stored:
                key = alias
        return key, (self.cfg.num_layers, *self.shapes[name])

    def _check_shapes(self) -> None:
        problems = []
        names = self.global_names + [f"{LAYER_PREFIX}0.{n}" for n in self.layer_names]
        for name in names:
            key, want = self._stored_key(name)
            item = self.stored.get(key)
            if item is None or not hasattr(item, "chunks"):
                problems.append(f"{key}: not in the checkpoint")
                continue
            got = tuple(item.size)
            if key in VOCAB_KEYS:  # stored padding may differ from ours
                got, want = got[1:], want[1:]
            if got != want:
                problems.append(
                    f"{key}: {tuple(item.size)} in the files, "
                    f"{self._stored_key(name)[1]} from the model config"
                )
        if problems:
            raise ConversionError(
                f"{self.path}: the weights do not match the model config "
                f"{self.path / fmt.RUN_CONFIG}: " + "; ".join(sorted(problems)[:6])
            )

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor (full name)."""
        return self.stored[self._stored_key(name)[0]].properties.dtype

    def _read(self, names: list[str], layer: int | None) -> dict[str, Tensor]:
        targets, items, out = {}, [], {}
        for name in names:
            key, shape = self._stored_key(name)
            if layer is None:
                shape = tuple(self.stored[key].size)
                offsets: tuple[int, ...] = (0,) * len(shape)
            else:
                shape, offsets = (1, *shape[1:]), (layer,) + (0,) * (len(shape) - 1)
            target = torch.empty(shape, dtype=self.dtype(name))
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(shape))
            items += create_read_items_for_chunk_list(key, self.stored[key], [chunk])
            targets[key] = target
            out[name] = target[0] if layer is not None else target
        try:
            self.reader.read_data(LoadPlan(items), _SliceLoader(targets)).wait()
        except Exception as err:  # noqa: BLE001 - a damaged or missing shard file
            raise ConversionError(
                f"{self.path}: cannot read {names[0].rsplit('.', 2)[0]}... ({first_line(err)})"
            ) from err
        bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
        if bad:
            raise ConversionError(f"{self.path}: non-finite values in {bad[:4]} (damaged files?)")
        return out

    def read_globals(self) -> dict[str, Tensor]:
        """Embedding, final norm and output layer (vocabulary rows as stored)."""
        return self._read(self.global_names, None)

    def read_layer(self, i: int) -> dict[str, Tensor]:
        """Layer ``i``'s tensors under their full names ``decoder.layers.{i}.*``."""
        return self._read([f"{LAYER_PREFIX}{i}.{n}" for n in self.layer_names], i)

    def read_all(self) -> dict[str, Tensor]:
        """The full state dict (every layer): what ``load_megatron_checkpoint`` returns."""
        out = self.read_globals()
        for i in range(self.cfg.num_layers):
            out.update(self.read_layer(i))
        return out
