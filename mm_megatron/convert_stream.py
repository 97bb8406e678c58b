"""Checkpoint conversion that streams layer by layer: Megatron → Hugging Face and
Hugging Face (or Megatron) → Megatron, with peak memory of a few layers plus the embeddings.

:func:`export_hf_stream` reads one layer at a time from the checkpoint
(:class:`~mm_megatron.checkpoint_stream.MegatronLayerReader`), maps it to the HF names and
writes it at once into the safetensors shards
(:class:`~mm_megatron.safetensors_stream.ShardedSafetensorsWriter`): the files are those of
:func:`mm_megatron.hf.export.export_hf`, byte for byte. :func:`save_megatron_stream` reads a
HF directory lazily (or a Megatron checkpoint layer by layer) into a staging safetensors
file that the spawned saving ranks read tensor by tensor.

Every conversion is checked in two ways before it is published:

* **exact, every tensor**: the written files are read back one layer at a time and mapped
  back; each tensor must equal the source's (HF export: by sha256 of the source's bytes;
  Megatron: compared with the staged input, the source widened where Megatron keeps fp32);
* **logits** (``parity``): ``full`` compares the whole source model with the whole converted
  one (both in fp32: about 8 bytes per parameter each); ``sample`` compares a probe made of
  the embeddings, the output layer and the first and last layers, taken from the source on
  one side and from the written files on the other; ``none`` skips it. Since every layer
  goes through the same per-layer mapping and the exact check proves each tensor went
  through it unchanged, the probe proves the mapping of all layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mm_megatron.checkpoint_io import (
    VOCAB_KEYS,
    ConversionError,
    check_output_dir,
    check_same_tensor,
    compare_logits,
)
from mm_megatron.config import ModelConfig
from mm_megatron.data.indexed import pid_alive
from mm_megatron.safetensors_stream import LazySafetensors, SafetensorsStreamError
from mm_megatron.safetensors_stream import ShardedSafetensorsWriter as Writer

Tensor = torch.Tensor
PARITY_MODES = ("sample", "full", "none")
_LAYER = re.compile(r"^(decoder\.layers\.|model\.layers\.|model\.blocks\.|blocks\.)(\d+)\.")
_MM_GLOBALS = {"embedding.word_embeddings.weight": "model.embedding.weight",
               "decoder.final_layernorm.weight": "model.final_norm.weight",
               "output_layer.weight": "lm_head.weight"}  # fmt: skip
_LLAMA_GLOBALS = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
                  "decoder.final_layernorm.weight": "model.norm.weight",
                  "output_layer.weight": "lm_head.weight"}  # fmt: skip


# --------------------------------------------------------------------------- temporary dirs


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` siblings of ``out_dir`` left by a
    conversion that was killed (its process no longer runs); returns what was removed."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(?:tmp|old)-(\d+)(?:-.*)?$")
    if not out_dir.parent.is_dir():
        return removed
    for path in out_dir.parent.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def make_temporary(out_dir: Path) -> Path:
    """A fresh ``.NAME.tmp-PID-*`` directory beside ``out_dir`` (stale ones removed first)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))


# --------------------------------------------------------------------------- name mapping


def _renumber(tensors: dict[str, Tensor], index: dict[int, int]) -> dict[str, Tensor]:
    """Rename ``...layers.{i}.`` / ``blocks.{i}.`` to ``index[i]`` (drop layers not in it)."""
    out = {}
    for key, value in tensors.items():
        match = _LAYER.match(key)
        if match is None:
            out[key] = value
        elif int(match.group(2)) in index:
            out[f"{match.group(1)}{index[int(match.group(2))]}.{key[match.end():]}"] = value
    return out


def megatron_to_hf_globals(meg: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Embedding, final norm, output layer → HF names (vocabulary padding cut), in the order
    of :func:`mm_megatron.hf.export.export_hf`."""
    names = _MM_GLOBALS if cfg.arch == "mm" else _LLAMA_GLOBALS
    return {names[k]: (meg[k][: cfg.vocab_size] if k in VOCAB_KEYS else meg[k]) for k in names}


def megatron_to_hf_layer(meg: dict[str, Tensor], cfg: ModelConfig, i: int) -> dict[str, Tensor]:
    """Layer ``i`` (Megatron names) → HF names."""
    if cfg.arch == "mm":
        from mm_megatron.hf.export import reference_to_hf
        from mm_megatron.weight_layout import megatron_layer_to_reference

        return reference_to_hf(megatron_layer_to_reference(meg, cfg, i))
    from mm_megatron.hf.llama_layout import megatron_gpt_layer_to_llama

    return megatron_gpt_layer_to_llama(meg, cfg, i)


def hf_to_megatron_globals(hf: dict[str, Tensor], cfg: ModelConfig, rows: int
                           ) -> dict[str, Tensor]:  # fmt: skip
    """HF embedding, final norm, output layer → Megatron names, ``rows`` vocabulary rows."""
    from mm_megatron.checkpoint_io import fit_vocab

    names = _MM_GLOBALS if cfg.arch == "mm" else _LLAMA_GLOBALS
    return fit_vocab({k: hf[v] for k, v in names.items()}, cfg, rows)


def hf_to_megatron_layer(hf: dict[str, Tensor], cfg: ModelConfig, i: int) -> dict[str, Tensor]:
    """Layer ``i`` (HF names) → Megatron names."""
    if cfg.arch == "mm":
        from mm_megatron.weight_layout import reference_layer_to_megatron

        return reference_layer_to_megatron({k.removeprefix("model."): v for k, v in hf.items()},
                                           cfg, i)  # fmt: skip
    from mm_megatron.hf.llama_layout import llama_layer_to_megatron

    return llama_layer_to_megatron(hf, cfg, i)


def _layer_keys(names: list[str], i: int) -> list[str]:
    return [k for k in names if (m := _LAYER.match(k)) and int(m.group(2)) == i]


def _digest(t: Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def probe_layers(num_layers: int) -> list[int]:
    """The layers of the sampled parity probe: the first and the last."""
    return sorted({0, num_layers - 1})


def _parity_label(parity: str, cfg: ModelConfig) -> str:
    if parity == "full":
        return "full model"
    layers = probe_layers(cfg.num_layers)
    return (f"sampled: layers {', '.join(map(str, layers))} of {cfg.num_layers}, embedding "
            "and output layer; --parity full for the whole model")  # fmt: skip


# --------------------------------------------------------------------------- Megatron → HF


def _write_probe(source: LazySafetensors, out: Path, cfg: ModelConfig, layers: list[int],
                 ids: tuple[int | None, int | None]) -> ModelConfig:  # fmt: skip
    """A HF directory of the probe model (``layers`` of ``source``, renumbered from 0)."""
    from mm_megatron.hf import export

    probe = dataclasses.replace(cfg, num_layers=len(layers))
    out.mkdir()
    export._hf_config(probe, *ids, torch.float32).to_json_file(str(out / "config.json"))
    index = {j: n for n, j in enumerate(layers)}
    names = [k for k in source.keys() if not _LAYER.match(k)]
    names += [k for j in layers for k in _layer_keys(source.keys(), j)]
    entries = [(_rename(k, index), source.shapes[k], source[k].dtype) for k in names]
    writer = Writer(out, entries, 0, single_file="model.safetensors")
    for k in names:
        writer.write(_rename(k, index), source[k])
    writer.close()
    return probe


def _rename(key: str, index: dict[int, int]) -> str:
    return next(iter(_renumber({key: torch.empty(0)}, index)))


def _verify_export(tmp: Path, cfg: ModelConfig, digests: dict[str, str]) -> int:
    """Read the written shards back layer by layer, map them back to Megatron names and
    compare each tensor with the source's digest; returns the number of tensors checked."""
    written = LazySafetensors(tmp)
    names = written.keys()
    meg = {k: v for k, v in _hf_back_globals(written, cfg).items()}
    for i in range(cfg.num_layers):
        layer = written.get(_layer_keys(names, i))
        meg.update(hf_to_megatron_layer(layer, cfg, i))
        for key in list(meg):
            if _digest(meg[key]) != digests.get(key):
                raise ConversionError(f"{tmp}: {key} read back from the written files differs "
                                      "from the checkpoint's")  # fmt: skip
        meg = {}
    return len(digests)


def _hf_back_globals(written: LazySafetensors, cfg: ModelConfig) -> dict[str, Tensor]:
    names = _MM_GLOBALS if cfg.arch == "mm" else _LLAMA_GLOBALS
    return {k: written[v] for k, v in names.items()}


def export_hf_stream(
    reader: Any, out_dir: str | Path, *, dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB", parity: str = "sample", max_abs_tol: float = 1e-3,
    kl_tol: float = 1e-5, overwrite: bool = False, license_file: str | Path | None = None,
) -> list[str]:  # fmt: skip
    """Write the HF directory of the checkpoint ``reader`` reads (a
    :class:`~mm_megatron.checkpoint_stream.MegatronLayerReader`) layer by layer, check it
    (exactly, and on logits as ``parity`` says) and publish it with the same side files and
    model card as :func:`~mm_megatron.hf.export.export_hf`; returns report lines."""
    from mm_megatron.checkpoint_io import MegatronLM
    from mm_megatron.hf import export, model_card

    if parity not in PARITY_MODES:
        raise ValueError(f"parity must be one of {PARITY_MODES}, not {parity!r}")
    out_dir, cfg = Path(out_dir), reader.cfg
    check_output_dir(out_dir, overwrite)
    if license_file is not None:
        model_card.check_license(license_file)
    files = [Path(p) for p in reader.tokenizer_files]
    side = export.release_tokenizer(files, cfg, None, None, None, reader.config)
    ids = (side.bos, side.eos)

    def cast(t: Tensor) -> Tensor:
        return t if dtype is None else t.to(dtype)

    def meta(names: list[str]) -> dict[str, Tensor]:
        return {k: torch.empty(reader.shapes[k], dtype=dtype or reader.dtype(k), device="meta")
                for k in names}  # fmt: skip

    plan = megatron_to_hf_globals(meta(reader.global_names), cfg)
    for i in range(cfg.num_layers):
        names = [f"decoder.layers.{i}.{n}" for n in reader.layer_names]
        plan.update(megatron_to_hf_layer(meta(names), cfg, i))
    try:
        export._check_names(plan, export._expected_shapes(cfg, *ids))
    except KeyError as err:
        raise ConversionError(f"{reader.path}: {err.args[0]}") from None
    tmp = make_temporary(out_dir)
    writer = None
    try:
        weights_dtype = dtype or next(iter(plan.values())).dtype
        written = export.write_side_files(tmp, cfg, side, files, weights_dtype)
        writer = Writer(tmp, [(k, v.shape, v.dtype) for k, v in plan.items()],
                        export._parse_size(max_shard_size))  # fmt: skip
        digests: dict[str, str] = {}
        top = {k: cast(v) for k, v in reader.read_globals().items()}
        for key, value in top.items():
            digests[key] = _digest(value[: cfg.vocab_size] if key in VOCAB_KEYS else value)
        for name, value in megatron_to_hf_globals(top, cfg).items():
            writer.write(name, value)
        for i in range(cfg.num_layers):
            layer = {k: cast(v) for k, v in reader.read_layer(i).items()}
            digests.update({k: _digest(v) for k, v in layer.items()})
            for name, value in megatron_to_hf_layer(layer, cfg, i).items():
                writer.write(name, value)
            del layer
        writer.close()
        lines = [f"read back: {_verify_export(tmp, cfg, digests)} tensors identical to the "
                 "checkpoint's after mapping back"]  # fmt: skip
        if parity != "none":
            prompt = export.default_prompt(cfg)
            if parity == "full":
                state = {k: cast(v) for k, v in reader.read_all().items()}
                model_dir, reference = tmp, MegatronLM(state, cfg).logits
            else:
                layers = probe_layers(cfg.num_layers)
                state = dict(top)
                for j in layers:
                    state.update({k: cast(v) for k, v in reader.read_layer(j).items()})
                state = _renumber(state, {j: n for n, j in enumerate(layers)})
                model_dir = tmp / ".parity_probe"
                probe = _write_probe(LazySafetensors(tmp), model_dir, cfg, layers, ids)
                reference = MegatronLM(state, probe).logits
            del top
            report = export.check_parity(model_dir, reference, prompt, max_abs_tol=max_abs_tol,
                                         kl_tol=kl_tol)  # fmt: skip
            shutil.rmtree(tmp / ".parity_probe", ignore_errors=True)
            lines.append(f"{report} ({_parity_label(parity, cfg)})")
        else:
            report = None
            lines.append("parity check skipped (--parity none)")
        export.write_card(tmp, out_dir.name, cfg, plan, side, report, False, reader.config,
                          reader.iteration, license_file, str(weights_dtype), written)  # fmt: skip
        export._publish(tmp, out_dir)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return lines


# --------------------------------------------------------------------------- → Megatron


class HFSource:
    """A Hugging Face directory from ``export_hf``, read lazily under Megatron names (the
    interface of :class:`~mm_megatron.checkpoint_stream.MegatronLayerReader`)."""

    def __init__(self, model_dir: str | Path, cfg: ModelConfig | None = None) -> None:
        from mm_megatron.checkpoint_io import _hf_expected_shapes, _hf_to_model_config

        self.path = Path(model_dir)
        config_file = self.path / "config.json"
        try:
            self.hf_config = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise ConversionError(f"{config_file}: cannot read ({err})") from None
        self.cfg = cfg or _hf_to_model_config(self.hf_config, config_file)
        try:
            self.files = LazySafetensors(self.path)
        except SafetensorsStreamError as err:
            raise ConversionError(str(err)) from None
        expected = _hf_expected_shapes(self.cfg, self.hf_config)
        shapes = self.files.shapes
        wrong = sorted(set(expected) ^ set(shapes)) + sorted(
            f"{k} {shapes[k]} != {tuple(s)}"
            for k, s in expected.items() if k in shapes and shapes[k] != tuple(s))  # fmt: skip
        if wrong:
            raise ConversionError(f"{self.path}: the weights do not match {config_file.name}: "
                                  f"{wrong[:6]}")  # fmt: skip
        self.rows = self.cfg.padded_vocab_size()

    def _get(self, names: list[str]) -> dict[str, Tensor]:
        try:
            return self.files.get(names)
        except SafetensorsStreamError as err:
            raise ConversionError(str(err)) from None

    def read_globals(self) -> dict[str, Tensor]:
        """Embedding, final norm and output layer under Megatron names (padded)."""
        names = _MM_GLOBALS if self.cfg.arch == "mm" else _LLAMA_GLOBALS
        return hf_to_megatron_globals(self._get(list(names.values())), self.cfg, self.rows)

    def read_layer(self, i: int) -> dict[str, Tensor]:
        """Layer ``i`` under Megatron names ``decoder.layers.{i}.*``."""
        layer = self._get(_layer_keys(self.files.keys(), i))
        return {k: v.contiguous() for k, v in hf_to_megatron_layer(layer, self.cfg, i).items()}


def _stage(source: Any, work: Path, rows: int, dtype: torch.dtype | None) -> Path:
    """Write the source's full Megatron state dict, ``rows`` vocabulary rows, layer by layer
    into ``work/model.safetensors`` (read by the saving ranks); returns its directory."""
    from mm_megatron.checkpoint_io import fit_vocab

    cfg = source.cfg
    work.mkdir()
    writer, entries = None, []

    def fit(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = fit_vocab(tensors, cfg, rows) if VOCAB_KEYS[0] in tensors else tensors
        return {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in out.items()}

    top = fit(source.read_globals())
    layer0 = fit(source.read_layer(0))
    for i in range(cfg.num_layers):
        entries += [(_rename(k, {0: i}), tuple(v.shape), v.dtype) for k, v in layer0.items()]
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
    from mm_megatron.checkpoint_stream import MegatronLayerReader

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
    source: Any, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
    tokenizer: list[Path] | None = None, config: dict[str, Any] | None = None,
    iteration: int = 0, dtype: torch.dtype | None = None, overwrite: bool = False,
    check: Callable[[Any], str] | None = None,
) -> list[str]:  # fmt: skip
    """Write ``source`` (a :class:`HFSource` or a ``MegatronLayerReader``) as a model-only
    checkpoint at TP=``tp``, PP=``pp`` (the layout of
    :func:`mm_megatron.checkpoint_io.save_megatron_checkpoint`), streaming: staged layer by
    layer, saved by one spawned rank per target rank, compared layer by layer with the
    staged input, then passed to ``check`` (which returns a report line or raises)."""
    import torch.multiprocessing as mp

    from mm_megatron.checkpoint_io import _save_rank, publish_dir
    from mm_megatron.config import ParallelConfig, validate_layout
    from mm_megatron.config_loading import ConfigError, to_mapping

    out_dir, cfg = Path(out_dir), source.cfg
    check_output_dir(out_dir, overwrite)
    try:
        validate_layout(cfg, ParallelConfig(tp, pp))
    except ConfigError as err:
        raise ConversionError(f"target layout: {err}") from None
    files = [Path(f) for f in tokenizer or []]
    for f in files:
        if not f.is_file():
            raise ConversionError(f"tokenizer file {f}: not found")
    run_config = dict(config or {})
    run_config["model"] = to_mapping(cfg)
    parallel = dict(run_config.get("parallel") or {})
    parallel.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    virtual_pipeline_model_parallel_size=None)  # fmt: skip
    if tp == 1:
        parallel["sequence_parallel"] = False
    run_config["parallel"] = parallel
    tmp = make_temporary(out_dir)
    try:
        work = _stage(source, tmp / "work", cfg.padded_vocab_size(tp), dtype)
        root = tmp / "ckpt"
        args = (tp * pp, str(work / "store"), tp, pp, cfg, str(work / "model.safetensors"),
                str(root), run_config, iteration)  # fmt: skip
        try:
            mp.start_processes(_save_rank, args=args, nprocs=tp * pp, start_method="spawn")
        except Exception as err:  # noqa: BLE001 - a rank's traceback, shortened
            last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            raise ConversionError(f"saving at TP={tp} PP={pp} failed: {last}") from err
        written = _verify_megatron(root, cfg, LazySafetensors(work))
        count = len(written.global_names) + cfg.num_layers * len(written.layer_names)
        lines = [f"loaded back: {count} tensors identical to the source"]
        if check is not None:
            lines.append(check(written))
        if files:
            (root / "tokenizer").mkdir()
            for f in files:
                shutil.copy2(f, root / "tokenizer" / f.name)
        publish_dir(root, out_dir)
        shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return lines


def hf_parity_check(source: HFSource, parity: str, max_abs_tol: float,
                    kl_tol: float) -> Callable[[Any], str] | None:  # fmt: skip
    """The ``check`` of :func:`save_megatron_stream` from a HF source: logits of the HF
    model (whole, or the sampled probe) vs the Megatron model on the written checkpoint."""
    from mm_megatron.checkpoint_io import MegatronLM
    from mm_megatron.hf.export import _load_exported, default_prompt

    if parity not in PARITY_MODES:
        raise ValueError(f"parity must be one of {PARITY_MODES}, not {parity!r}")
    if parity == "none":
        return None
    cfg = source.cfg

    def check(written: Any) -> str:
        prompt = default_prompt(cfg)
        if parity == "full":
            hf = _load_exported(source.path, "cpu")
            meg = MegatronLM(written.read_all(), cfg)
        else:
            layers = probe_layers(cfg.num_layers)
            index = {j: n for n, j in enumerate(layers)}
            probe_dir = Path(tempfile.mkdtemp(prefix=".parity_probe-", dir=written.path.parent))
            try:
                probe = _write_probe(source.files, probe_dir / "hf", cfg, layers, (None, None))
                hf = _load_exported(probe_dir / "hf", "cpu")
            finally:
                shutil.rmtree(probe_dir, ignore_errors=True)
            state = written.read_globals()
            for j in layers:
                state.update(written.read_layer(j))
            meg = MegatronLM(_renumber(state, index), probe)
        report = compare_logits(lambda t: hf(t, use_cache=False).logits, meg.logits, prompt,
                                max_abs_tol, kl_tol)  # fmt: skip
        return f"Megatron vs Hugging Face source: {report} ({_parity_label(parity, cfg)})"

    return check
