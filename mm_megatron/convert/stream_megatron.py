"""Hugging Face (or Megatron) → Megatron, streaming: a model-only checkpoint at any TP/PP
with peak memory of a few layers plus the embeddings.

:func:`save_megatron_stream` reads a HF directory lazily
(:class:`~mm_megatron.convert.hf_import.HFSource`) or a Megatron checkpoint layer by layer
(:class:`~mm_megatron.convert.layer_reader.MegatronLayerReader`) into a staging safetensors
file that the spawned saving ranks read tensor by tensor. The written checkpoint is read back
layer by layer and compared exactly with the staged input (the source widened where Megatron
keeps fp32), then, from HF, on logits (:func:`hf_parity_check`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.convert.hf_import import HFSource
from mm_megatron.convert.hf_layout import rename, renumber
from mm_megatron.convert.layer_reader import MegatronLayerReader
from mm_megatron.convert.megatron_io import (
    check_same_tensor,
    copy_tokenizer,
    spawn_save,
    target_run_config,
)
from mm_megatron.convert.megatron_lm import MegatronLM
from mm_megatron.convert.megatron_state import VOCAB_KEYS, fit_vocab
from mm_megatron.convert.outputs import check_output_dir, make_temporary, publish_dir
from mm_megatron.convert.parity import compare_logits, default_prompt, hf_logits, load_hf_model
from mm_megatron.convert.probe import (
    check_parity_mode,
    parity_label,
    probe_layers,
    write_probe,
)
from mm_megatron.convert.safetensors_io import LazySafetensors
from mm_megatron.convert.safetensors_io import ShardedSafetensorsWriter as Writer

Tensor = torch.Tensor


def _stage(source: Any, work: Path, rows: int, dtype: torch.dtype | None) -> Path:
    """Write the source's full Megatron state dict, ``rows`` vocabulary rows, layer by layer
    into ``work/model.safetensors`` (read by the saving ranks); returns its directory."""
    cfg = source.cfg
    work.mkdir()
    writer, entries = None, []

    def fit(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = fit_vocab(tensors, cfg, rows) if VOCAB_KEYS[0] in tensors else tensors
        return {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in out.items()}

    top = fit(source.read_globals())
    layer0 = fit(source.read_layer(0))
    for i in range(cfg.num_layers):
        entries += [(rename(k, {0: i}), tuple(v.shape), v.dtype) for k, v in layer0.items()]
    entries += [(k, tuple(v.shape), v.dtype) for k, v in top.items()]
    writer = Writer(work, entries, 0, single_file="model.safetensors")
    try:
        for tensors in (top, layer0):
            for k, v in tensors.items():
                writer.write(k, v)
        del top, layer0
        for i in range(1, cfg.num_layers):
            for k, v in fit(source.read_layer(i)).items():
                writer.write(k, v)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return work


def _verify_megatron(root: Path, cfg: ModelConfig, staged: LazySafetensors) -> Any:
    """Compare the written checkpoint, layer by layer, with the staged input."""
    written = MegatronLayerReader(root, cfg)
    V = cfg.vocab_size
    for key, value in written.read_globals().items():
        want = staged[key]
        a, b = (value[:V], want[:V]) if key in VOCAB_KEYS else (value, want)
        check_same_tensor(key, a, b)
    for i in range(cfg.num_layers):
        for key, value in written.read_layer(i).items():
            check_same_tensor(key, value, staged[key])
    return written


def save_megatron_stream(
    source: Any,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    tokenizer: list[Path] | None = None,
    config: dict[str, Any] | None = None,
    iteration: int = 0,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    check: Callable[[Any], str] | None = None,
) -> list[str]:
    """Write ``source`` (a :class:`HFSource` or a ``MegatronLayerReader``) as a model-only
    checkpoint at TP=``tp``, PP=``pp`` (the format of
    :func:`mm_megatron.convert.megatron_io.save_megatron_checkpoint`), streaming: staged
    layer by layer, saved by one spawned rank per target rank, compared layer by layer with
    the staged input, then passed to ``check`` (which returns a report line or raises)."""
    out_dir, cfg = Path(out_dir), source.cfg
    check_output_dir(out_dir, overwrite)
    run_config, files = target_run_config(cfg, config, tp, pp, tokenizer or [])
    tmp = make_temporary(out_dir)
    try:
        work = _stage(source, tmp / "work", cfg.padded_vocab_size(tp), dtype)
        root = tmp / "ckpt"
        spawn_save(
            tp, pp, work / "store", cfg, work / "model.safetensors", root, run_config, iteration
        )
        written = _verify_megatron(root, cfg, LazySafetensors(work))
        count = len(written.global_names) + cfg.num_layers * len(written.layer_names)
        lines = [f"loaded back: {count} tensors identical to the source"]
        if check is not None:
            lines.append(check(written))
        copy_tokenizer(root, files)
        publish_dir(root, out_dir)
        shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return lines


def hf_parity_check(
    source: HFSource, parity: str, max_abs_tol: float, kl_tol: float
) -> Callable[[Any], str] | None:
    """The ``check`` of :func:`save_megatron_stream` from a HF source: logits of the HF
    model (whole, or the sampled probe) vs the Megatron model on the written checkpoint."""
    check_parity_mode(parity)
    if parity == "none":
        return None
    cfg = source.cfg

    def check(written: Any) -> str:
        prompt = default_prompt(cfg)
        if parity == "full":
            hf = load_hf_model(source.path)
            meg = MegatronLM(written.read_all(), cfg)
        else:
            layers = probe_layers(cfg.num_layers)
            index = {j: n for n, j in enumerate(layers)}
            probe_dir = Path(tempfile.mkdtemp(prefix=".parity_probe-", dir=written.path.parent))
            try:
                probe = write_probe(source.files, probe_dir / "hf", cfg, layers, (None, None))
                hf = load_hf_model(probe_dir / "hf")
            finally:
                shutil.rmtree(probe_dir, ignore_errors=True)
            state = written.read_globals()
            for j in layers:
                state.update(written.read_layer(j))
            meg = MegatronLM(renumber(state, index), probe)
        report = compare_logits(hf_logits(hf), meg.logits, prompt, max_abs_tol, kl_tol)
        return f"Megatron vs Hugging Face source: {report} ({parity_label(parity, cfg)})"

    return check
