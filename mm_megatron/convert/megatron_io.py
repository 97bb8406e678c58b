"""Our Megatron checkpoints as full (unsharded) state dicts, on CPU: load and model-only save.

A training checkpoint (:mod:`mm_megatron.checkpoint.format`) saved at any TP/PP/VPP layout is
loaded into a TP=1, PP=1 model in one process (``dist_checkpointing`` reshards), giving the
full Megatron state dict that :mod:`mm_megatron.convert.mm_layout` and
:func:`mm_megatron.convert.hf_export.export_hf` read.

:func:`save_megatron_checkpoint` writes the opposite: a model-only checkpoint in the same
format (no optimizer, scheduler or data state), saved from the target TP/PP layout by one
spawned gloo process per rank, usable with ``checkpoint.init_from=`` and by
:func:`load_megatron_checkpoint`. It is written into a temporary sibling directory, checked by
loading it back, and renamed into place only then.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from mm_megatron.checkpoint import format as fmt
from mm_megatron.checkpoint.sharded import TrainState, save_checkpoint
from mm_megatron.config import ModelConfig, ParallelConfig, validate_layout
from mm_megatron.config_loading import ConfigError, from_mapping, load_yaml, to_mapping
from mm_megatron.convert.megatron_state import VOCAB_KEYS, fit_vocab
from mm_megatron.convert.outputs import (
    ConversionError,
    check_output_dir,
    make_temporary,
    publish_dir,
)
from mm_megatron.convert.safetensors_io import open_tensors
from mm_megatron.cpu_compat import enable_cpu_mode
from mm_megatron.model import build_stage, init_model_parallel, transformer_config
from mm_megatron.parallel_layout import load_full_state_dict

Tensor = torch.Tensor


@dataclass
class MegatronCheckpoint:
    """A Megatron checkpoint loaded on CPU."""

    path: Path  # the iter_XXXXXXX directory
    cfg: ModelConfig
    state_dict: dict[str, Tensor]  # full TP=1/PP=1 names; vocabulary rows as stored (padded)
    config: dict[str, Any]  # the resolved config.yaml
    iteration: int
    layout: dict[str, int]  # the layout it was saved from (tp, pp, dp)
    tokenizer_files: list[Path]


def init_cpu_process_group() -> None:
    """Make this process a one-rank gloo group with TP=1, PP=1 (idempotent, CPU mode)."""
    enable_cpu_mode()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConversionError("checkpoint conversion runs in one process (world size 1)")
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(ParallelConfig(), 0)


def build_full_model(cfg: ModelConfig, vocab_rows: int, dtype: torch.dtype) -> Any:
    """A TP=1, PP=1 model with ``vocab_rows`` embedding/classifier rows (the stored padding)."""
    init_cpu_process_group()
    build_cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=vocab_rows)
    model = build_stage(build_cfg, transformer_config(build_cfg, params_dtype=dtype))
    return model.eval()


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """:func:`mm_megatron.checkpoint.format.resolve_checkpoint_dir`, failing with a
    :class:`ConversionError`."""
    try:
        return fmt.resolve_checkpoint_dir(path)
    except fmt.CheckpointFormatError as err:
        raise ConversionError(str(err)) from None


def read_run_config(ckpt_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config (``model:`` section of ``config.yaml``) and the whole mapping."""
    path = ckpt_dir / fmt.RUN_CONFIG
    try:
        data = load_yaml(path)
        if "model" not in data:
            raise ConfigError(f"{path}: no 'model' section")
        return from_mapping(ModelConfig, data["model"], "model"), data
    except ConfigError as err:
        raise ConversionError(str(err) if str(path) in str(err) else f"{path}: {err}") from None


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _check_against_files(template: dict[str, Any], stored: dict[str, Any], where: Path) -> None:
    """Every tensor of the model exists in the checkpoint with the same global shape."""
    problems = []
    for item in nested_values(template):
        if not isinstance(item, ShardedTensor):
            continue
        if item.key not in stored:
            problems.append(f"{item.key}: not in the checkpoint")
        elif tuple(stored[item.key].global_shape) != tuple(item.global_shape):
            problems.append(
                f"{item.key}: {tuple(stored[item.key].global_shape)} in the files, "
                f"{tuple(item.global_shape)} from the model config"
            )
    if problems:
        raise ConversionError(
            f"{where}: the weights do not match the model config {where / fmt.RUN_CONFIG}: "
            + "; ".join(sorted(set(problems))[:6])
        )


def load_megatron_checkpoint(
    path: str | Path, cfg: ModelConfig | None = None, tokenizer: str | Path | None = None
) -> MegatronCheckpoint:
    """Load a run root (the tracker's iteration) or an ``iter_*`` directory on CPU.

    ``cfg`` replaces the checkpoint's ``config.yaml`` model section. Tokenizer files come from
    ``<root>/tokenizer/`` unless ``tokenizer`` (a file or a directory) is given.
    """
    ckpt_dir = resolve_checkpoint_dir(path)
    run_cfg, config = read_run_config(ckpt_dir)
    cfg = cfg or run_cfg
    manifest = fmt.read_manifest(ckpt_dir)
    init_cpu_process_group()
    for name, read in (
        (fmt.DIST_METADATA, dist_checkpointing.load_tensors_metadata),
        (fmt.COMMON_STATE, dist_checkpointing.load_common_state_dict),
    ):
        try:
            result = read(str(ckpt_dir))
        except Exception as err:  # noqa: BLE001 - any reader error means a damaged file
            raise ConversionError(f"{ckpt_dir / name}: unreadable ({first_line(err)})") from err
        if name == fmt.DIST_METADATA:
            stored = result
    embed = stored.get(VOCAB_KEYS[0])
    if embed is None:
        raise ConversionError(f"{ckpt_dir}: no {VOCAB_KEYS[0]} in the checkpoint")
    rows = max(embed.global_shape[0], cfg.vocab_size)
    model = build_full_model(cfg, rows, embed.dtype)
    template = {"model": model.sharded_state_dict()}
    _check_against_files(template, stored, ckpt_dir)
    try:
        loaded = dist_checkpointing.load(template, str(ckpt_dir))
        model.load_state_dict(loaded["model"])
    except Exception as err:  # noqa: BLE001
        raise ConversionError(
            f"{ckpt_dir}: cannot load the model weights ({first_line(err)})"
        ) from err
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ConversionError(f"{ckpt_dir}: non-finite values in {bad[:4]} (damaged files?)")
    return MegatronCheckpoint(
        path=ckpt_dir,
        cfg=cfg,
        state_dict=state,
        config=config,
        iteration=int(manifest.get("iteration", 0)),
        layout=manifest.get("layout", {}),
        tokenizer_files=fmt.tokenizer_files(tokenizer or fmt.run_tokenizer_dir(ckpt_dir)),
    )


def target_run_config(
    cfg: ModelConfig,
    config: dict[str, Any] | None,
    tp: int,
    pp: int,
    tokenizer: Iterable[str | Path],
) -> tuple[dict[str, Any], list[Path]]:
    """Check a save's target layout and tokenizer files; returns the run config to store
    (``config`` with its ``model`` and ``parallel`` sections replaced) and the files."""
    try:
        validate_layout(cfg, ParallelConfig(tp, pp))
    except ConfigError as err:
        raise ConversionError(f"target layout: {err}") from None
    files = [Path(f) for f in tokenizer]
    for f in files:
        if not f.is_file():
            raise ConversionError(f"tokenizer file {f}: not found")
    run_config = dict(config or {})
    run_config["model"] = to_mapping(cfg)
    parallel = dict(run_config.get("parallel") or {})
    parallel.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
    )
    if tp == 1:
        parallel["sequence_parallel"] = False
    run_config["parallel"] = parallel
    return run_config, files


def _save_rank(
    rank: int,
    world: int,
    store_file: str,
    tp: int,
    pp: int,
    cfg: ModelConfig,
    full_file: str,
    root: str,
    config: dict[str, Any],
    iteration: int,
) -> None:
    """One spawned rank of :func:`save_megatron_checkpoint`."""
    torch.set_num_threads(1)
    enable_cpu_mode()
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_file, world), rank=rank, world_size=world
    )
    try:
        parallel = ParallelConfig(tp, pp)
        init_model_parallel(parallel, 0)
        full = open_tensors(full_file)
        dtype = full[VOCAB_KEYS[0]].dtype
        tconfig = transformer_config(cfg, parallel, params_dtype=dtype)
        model = build_stage(cfg, tconfig)
        load_full_state_dict(model, full, tconfig)
        save_checkpoint(root, [model], None, None, TrainState(iteration=iteration), config)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def spawn_save(
    tp: int,
    pp: int,
    store_file: Path,
    cfg: ModelConfig,
    full_file: Path,
    root: Path,
    run_config: dict[str, Any],
    iteration: int,
) -> None:
    """Save the full state dict in ``full_file`` as a checkpoint under ``root`` at TP=``tp``,
    PP=``pp``: one spawned gloo process per rank."""
    args = (tp * pp, str(store_file), tp, pp, cfg, str(full_file), str(root), run_config, iteration)
    try:
        mp.start_processes(_save_rank, args=args, nprocs=tp * pp, start_method="spawn")
    except Exception as err:  # noqa: BLE001 - a rank's traceback, shortened
        last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        raise ConversionError(f"saving at TP={tp} PP={pp} failed: {last}") from err


def copy_tokenizer(root: Path, files: list[Path]) -> None:
    """Copy the tokenizer files into the run root's ``tokenizer/``."""
    if files:
        (root / fmt.TOKENIZER_DIR).mkdir()
        for f in files:
            shutil.copy2(f, root / fmt.TOKENIZER_DIR / f.name)


def save_megatron_checkpoint(
    state_dict: dict[str, Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    tokenizer: Iterable[str | Path] = (),
    config: dict[str, Any] | None = None,
    iteration: int = 0,
    overwrite: bool = False,
    check: Callable[[MegatronCheckpoint], Any] | None = None,
) -> MegatronCheckpoint:
    """Write ``state_dict`` (full Megatron names) as a model-only checkpoint at TP=``tp``,
    PP=``pp`` under ``out_dir`` (a run root: ``iter_XXXXXXX/``, tracker, ``tokenizer/``).

    ``config`` is the resolved training config to store (its ``model`` and ``parallel``
    sections are replaced; default: only those). The result is loaded back and compared
    tensor by tensor (and passed to ``check``, which raises to refuse it) before ``out_dir``
    appears; returns that loaded checkpoint.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    run_config, files = target_run_config(cfg, config, tp, pp, tokenizer)
    full = fit_vocab(state_dict, cfg, cfg.padded_vocab_size(tp))
    tmp = make_temporary(out_dir)
    try:
        work = tmp / "work"
        work.mkdir()
        full_file = work / "full.pt"
        torch.save({k: v.contiguous() for k, v in full.items()}, full_file)
        root = tmp / "ckpt"
        spawn_save(tp, pp, work / "store", cfg, full_file, root, run_config, iteration)
        shutil.rmtree(work)
        copy_tokenizer(root, files)
        written = load_megatron_checkpoint(root, cfg)
        compare_state_dicts(written.state_dict, state_dict, cfg)
        if check is not None:
            check(written)
        publish_dir(root, out_dir)
        shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written.path = out_dir / written.path.name
    written.tokenizer_files = [out_dir / fmt.TOKENIZER_DIR / f.name for f in files]
    return written


def compare_state_dicts(got: dict[str, Tensor], want: dict[str, Tensor], cfg: ModelConfig) -> int:
    """Raise unless both hold the same tensors exactly (vocabulary padding ignored); returns
    the number of tensors compared."""
    if set(got) != set(want):
        raise ConversionError(f"tensor names differ: {sorted(set(got) ^ set(want))[:6]}")
    V = cfg.vocab_size
    for key in want:
        a, b = (got[key][:V], want[key][:V]) if key in VOCAB_KEYS else (got[key], want[key])
        check_same_tensor(key, a, b)
    return len(want)


def check_same_tensor(key: str, written: Tensor, source: Tensor) -> None:
    """Raise unless ``written`` holds exactly ``source``'s values, in the same or a wider
    dtype (Megatron keeps per-head scalars in fp32): the source is widened, never rounded."""
    if written.dtype != source.dtype:
        if torch.promote_types(written.dtype, source.dtype) != written.dtype:
            raise ConversionError(f"{key}: written as {written.dtype}, input {source.dtype}")
        source = source.to(written.dtype)
    if written.shape != source.shape or not torch.equal(written, source):
        raise ConversionError(f"{key}: the written checkpoint differs from the input")
