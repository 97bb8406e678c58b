"""Megatron → Hugging Face, layer by layer, with peak memory of a few layers plus the
embeddings.

:func:`export_hf_stream` reads one layer at a time from the checkpoint
(:class:`~mm_megatron.convert.layer_reader.MegatronLayerReader`), maps it to the HF names and
writes it at once into the safetensors shards
(:class:`~mm_megatron.convert.safetensors_io.ShardedSafetensorsWriter`): the files are those
of :func:`mm_megatron.convert.hf_export.export_hf`, byte for byte.

The export is checked in two ways before it is published:

* **exact, every tensor**: the written files are read back one layer at a time and mapped
  back; each tensor must equal the checkpoint's (by sha256 of its bytes);
* **logits** (``parity``): ``full`` compares the whole Megatron model with the whole exported
  one (both in fp32: about 8 bytes per parameter each); ``sample`` compares the probe of
  :mod:`mm_megatron.convert.probe`; ``none`` skips it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.convert.hf_config import expected_hf_shapes
from mm_megatron.convert.hf_export import (
    check_hf_names,
    release_tokenizer,
    write_card,
    write_side_files,
)
from mm_megatron.convert.hf_layout import (
    global_names,
    hf_to_megatron_layer,
    layer_keys,
    megatron_to_hf_globals,
    megatron_to_hf_layer,
    renumber,
)
from mm_megatron.convert.megatron_lm import MegatronLM
from mm_megatron.convert.megatron_state import VOCAB_KEYS
from mm_megatron.convert.model_card import check_license
from mm_megatron.convert.outputs import (
    ConversionError,
    check_output_dir,
    make_temporary,
    publish_dir,
)
from mm_megatron.convert.parity import check_parity, default_prompt
from mm_megatron.convert.probe import (
    check_parity_mode,
    parity_label,
    probe_layers,
    write_probe,
)
from mm_megatron.convert.safetensors_io import LazySafetensors, parse_size
from mm_megatron.convert.safetensors_io import ShardedSafetensorsWriter as Writer

Tensor = torch.Tensor


def digest(t: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _verify_export(tmp: Path, cfg: ModelConfig, digests: dict[str, str]) -> int:
    """Read the written shards back layer by layer, map them back to Megatron names and
    compare each tensor with the source's digest; returns the number of tensors checked."""
    written = LazySafetensors(tmp)
    names = written.keys()
    meg = {k: written[v] for k, v in global_names(cfg).items()}
    for i in range(cfg.num_layers):
        layer = written.get(layer_keys(names, i))
        meg.update(hf_to_megatron_layer(layer, cfg, i))
        for key in list(meg):
            if digest(meg[key]) != digests.get(key):
                raise ConversionError(
                    f"{tmp}: {key} read back from the written files differs from the checkpoint's"
                )
        meg = {}
    return len(digests)


def export_hf_stream(
    reader: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    parity: str = "sample",
    max_abs_tol: float = 1e-3,
    kl_tol: float = 1e-5,
    overwrite: bool = False,
    license_file: str | Path | None = None,
) -> list[str]:
    """Write the HF directory of the checkpoint ``reader`` reads (a
    :class:`~mm_megatron.convert.layer_reader.MegatronLayerReader`) layer by layer, check it
    (exactly, and on logits as ``parity`` says) and publish it with the same side files and
    model card as :func:`~mm_megatron.convert.hf_export.export_hf`; returns report lines."""
    check_parity_mode(parity)
    out_dir, cfg = Path(out_dir), reader.cfg
    check_output_dir(out_dir, overwrite)
    if license_file is not None:
        check_license(license_file)
    files = [Path(p) for p in reader.tokenizer_files]
    side = release_tokenizer(files, cfg, None, None, None, reader.config)
    ids = (side.bos, side.eos)

    def cast(t: Tensor) -> Tensor:
        return t if dtype is None else t.to(dtype)

    def meta(names: list[str]) -> dict[str, Tensor]:
        return {
            k: torch.empty(reader.shapes[k], dtype=dtype or reader.dtype(k), device="meta")
            for k in names
        }

    plan = megatron_to_hf_globals(meta(reader.global_names), cfg)
    for i in range(cfg.num_layers):
        names = [f"decoder.layers.{i}.{n}" for n in reader.layer_names]
        plan.update(megatron_to_hf_layer(meta(names), cfg, i))
    try:
        check_hf_names(plan, expected_hf_shapes(cfg))
    except KeyError as err:
        raise ConversionError(f"{reader.path}: {err.args[0]}") from None
    tmp = make_temporary(out_dir)
    writer = None
    try:
        weights_dtype = dtype or next(iter(plan.values())).dtype
        written = write_side_files(tmp, cfg, side, files, weights_dtype)
        writer = Writer(
            tmp, [(k, v.shape, v.dtype) for k, v in plan.items()], parse_size(max_shard_size)
        )
        digests: dict[str, str] = {}
        top = {k: cast(v) for k, v in reader.read_globals().items()}
        for key, value in top.items():
            digests[key] = digest(value[: cfg.vocab_size] if key in VOCAB_KEYS else value)
        for name, value in megatron_to_hf_globals(top, cfg).items():
            writer.write(name, value)
        for i in range(cfg.num_layers):
            layer = {k: cast(v) for k, v in reader.read_layer(i).items()}
            digests.update({k: digest(v) for k, v in layer.items()})
            for name, value in megatron_to_hf_layer(layer, cfg, i).items():
                writer.write(name, value)
            del layer
        writer.close()
        lines = [
            f"read back: {_verify_export(tmp, cfg, digests)} tensors identical to the "
            "checkpoint's after mapping back"
        ]
        if parity != "none":
            prompt = default_prompt(cfg)
            if parity == "full":
                state = {k: cast(v) for k, v in reader.read_all().items()}
                model_dir, reference = tmp, MegatronLM(state, cfg).logits
            else:
                layers = probe_layers(cfg.num_layers)
                state = dict(top)
                for j in layers:
                    state.update({k: cast(v) for k, v in reader.read_layer(j).items()})
                state = renumber(state, {j: n for n, j in enumerate(layers)})
                model_dir = tmp / ".parity_probe"
                probe = write_probe(LazySafetensors(tmp), model_dir, cfg, layers, ids)
                reference = MegatronLM(state, probe).logits
            del top
            report = check_parity(
                model_dir, reference, prompt, max_abs_tol=max_abs_tol, kl_tol=kl_tol
            )
            shutil.rmtree(tmp / ".parity_probe", ignore_errors=True)
            lines.append(f"{report} ({parity_label(parity, cfg)})")
        else:
            report = None
            lines.append("parity check skipped (--parity none)")
        write_card(
            tmp,
            out_dir.name,
            cfg,
            plan,
            side,
            report,
            False,
            reader.config,
            reader.iteration,
            license_file,
            str(weights_dtype),
            written,
        )
        publish_dir(tmp, out_dir)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return lines
