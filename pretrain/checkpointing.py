"""Megatron distributed checkpoints: atomic save, a "latest" tracker, retention, safe resume.

Layout under ``checkpoint.dir``::

    iter_0000100/                     one complete checkpoint (torch_dist format)
        mm_checkpoint.json            manifest: iteration, layout, file sizes and sha256
        config.yaml                   the resolved config of the run that saved it
    latest_checkpointed_iteration.txt the newest complete checkpoint's iteration

A checkpoint is written into ``iter_XXXXXXX.tmp``; once every rank has finished, rank 0
writes the manifest, renames the directory and then rewrites the tracker (each by a
rename), so an interrupted save never looks complete. Each rank hashes (sha256) the shards it
wrote, and the manifest records every file's size and hash. Resume checks the manifest against
the files on disk before loading (sizes on every rank, hashes shared out across the ranks) and
falls back to the previous complete checkpoint, saying why, if the latest one is damaged or
fails to load for any reason. The model and optimizer are saved with their sharded state
dicts, so a checkpoint loads under another TP/PP/DP layout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from pretrain import ckpt_space as space
from pretrain import retention
from pretrain.stopping import helper_initializer, stop_signals_blocked

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "mm_checkpoint.json"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def start_writer_helpers() -> None:
    """Start megatron's checkpoint-writer helper process now, immune to the stop signals.

    megatron-core's file-system writer (synchronous and asynchronous saves alike) collects
    its workers' results through a queue served by a ``spawn``-ed multiprocessing manager,
    started at the first save and reused by every later one. SLURM delivers SIGTERM (cancel,
    requeue, time limit, node failure) and a forwarded SIGUSR1 to every process of the job
    step; with the default action the manager dies, and the save made for the stop then
    fails (BrokenPipeError, or ConnectionRefusedError in the asynchronous writer). Here the
    manager ignores those signals; it is shut down when the training process exits (or
    exits by itself when that process is gone). The
    forked writer processes inherit the training process's recording handlers.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    # What ctx.Manager() does, plus the initializer it cannot pass.
    sync = SyncManager(ctx=mp.get_context("spawn"))
    with stop_signals_blocked():
        sync.start(initializer=helper_initializer)
    filesystem_async._results_queue = sync.Queue()
    _writer_helpers.append(sync)


_writer_helpers: list[Any] = []  # keeps the manager (and so its queue) alive


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_object() -> ShardedObject:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}  # fmt: skip
    pp = parallel_state.get_pipeline_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_rank()
    return ShardedObject(
        "rng_state", state, (parallel_state.get_pipeline_model_parallel_world_size(),
                             parallel_state.get_tensor_model_parallel_world_size()),
        (pp, tp), replica_id=parallel_state.get_data_parallel_rank(),
    )  # fmt: skip


def sharded_state(
    model: list[Any], optimizer: Any | None, scheduler: Any | None, state: TrainState,
    is_loading: bool, with_rng: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """The checkpoint's sharded state dict (model chunks, optimizer, scheduler, RNG, data)."""
    model = unwrap_model(model)
    sd: dict[str, Any] = {}
    if len(model) == 1:
        sd["model"] = model[0].sharded_state_dict()
    else:
        for i, chunk in enumerate(model):
            sd[f"model{i}"] = chunk.sharded_state_dict()
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = vars(state).copy()
    sd["layout"] = _layout()
    if with_rng:
        sd["rng_state"] = _rng_object()
    return sd


def save_checkpoint(
    root: str, model: list[Any], optimizer: Any, scheduler: Any, state: TrainState,
    config_dict: dict[str, Any], keep_last: int | None, async_queue: Any = None,
) -> Path:  # fmt: skip
    """Save atomically (see module docstring); collective over all ranks.

    With ``async_queue`` (a megatron ``AsyncCallsQueue``) the tensors are written in the
    background; the checkpoint becomes visible (manifest, rename, tracker) only when the
    queue finalises the call after every rank has finished writing.
    """
    final = iteration_dir(root, state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = sharded_state(model, optimizer, scheduler, state, is_loading=False)
    iteration = state.iteration
    publish = functools.partial(_publish, Path(root), tmp, final, iteration, config_dict,
                                keep_last)  # fmt: skip
    if async_queue is not None:
        request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
        return final
    try:
        dist_checkpointing.save(sd, str(tmp))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException wraps the OSError
        if space.is_out_of_space(err) or space.looks_full(root, tmp):
            raise space.out_of_space_error(root, tmp) from err
        raise
    dist.barrier()
    publish()
    dist.barrier()
    return final


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _own_shard_hashes(tmp: Path) -> dict[str, str]:
    """sha256 of the shards this rank wrote (torch_dist names them ``__<rank>_<n>.distcp``),
    hashed right after writing, while they are still in the page cache; gathered from every
    rank (collective), so no rank reads the whole checkpoint."""
    rank = dist.get_rank()
    mine = {p.name: sha256_file(p) for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered if part for k, v in part.items()}


def _publish(
    root: Path, tmp: Path, final: Path, iteration: int, config_dict: dict[str, Any],
    keep_last: int | None,
) -> None:  # fmt: skip
    """Once every rank's files are written (collective): every rank hashes its shards, then
    rank 0 writes the manifest, renames, rewrites the tracker and applies retention."""
    hashes = _own_shard_hashes(tmp)
    if dist.get_rank() != 0:
        return
    (tmp / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
    for p in paths:  # the small common files (metadata, common state, config)
        hashes.setdefault(str(p.relative_to(tmp)), sha256_file(p))
    manifest = {"iteration": iteration, "layout": _layout(), "files": files,
                "sha256": {name: hashes[name] for name in files}}  # fmt: skip
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / TRACKER, f"{iteration}\n")
    _apply_retention(root, keep_last, iteration)


def _apply_retention(root: Path, keep_last: int | None, newest: int) -> None:
    space.remove_stale_tmp(str(root), below=newest)  # saves that never published
    retention.schedule(root, keep_last, newest, list_checkpoints, _log_flush)  # off the step


def _log_flush(message: str) -> None:
    print(message, flush=True)


def list_checkpoints(root: str | Path) -> list[int]:
    """Iterations of the complete-looking checkpoint directories (manifest present)."""
    out = []
    for path in Path(root).glob("iter_*"):
        if path.name.endswith(".tmp") or not (path / MANIFEST).is_file():
            continue
        try:
            out.append(int(path.name[len("iter_") :]))
        except ValueError:
            continue
    return sorted(out)


def verify_checkpoint(path: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None if its files match its manifest.

    Every file's presence and size are checked; the sha256 of the files whose index in the
    manifest is ``share[0]`` modulo ``share[1]`` (all of them by default), so that N ranks
    verify a checkpoint together, each reading 1/N of it.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{path}: no {MANIFEST} (incomplete save)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        hashes = manifest.get("sha256", {})  # absent in checkpoints saved before hashes
    except (ValueError, KeyError, AttributeError) as err:
        return f"{manifest_path}: unreadable manifest ({err})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{path}: missing file {name}"
        if f.stat().st_size != size:
            return f"{path}: {name} has {f.stat().st_size} bytes, manifest says {size}"
    index, count = share
    for i, name in enumerate(sorted(hashes)):
        if i % count == index and sha256_file(path / name) != hashes[name]:
            return f"{path}: {name} does not match its sha256 in the manifest (corrupted)"
    return None


def _verify_together(path: Path) -> str | None:
    """verify_checkpoint shared out across the ranks (collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return verify_checkpoint(path)
    problem = verify_checkpoint(path, (dist.get_rank(), dist.get_world_size()))
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problem)
    return next((p for p in gathered if p), None)


def find_resume_checkpoint(root: str, log: Any, exclude: frozenset[int] = frozenset()
                           ) -> Path | None:  # fmt: skip
    """The checkpoint to resume from: the tracker's, or the newest verified one before it.

    None when ``root`` holds no checkpoint at all (a fresh start). Raises CheckpointError if
    checkpoints exist but none is usable, rather than silently starting from scratch.
    Iterations in ``exclude`` (which failed to load) are skipped. Collective when the
    process group is initialised (the ranks share the hashing).
    """
    base = Path(root)
    tracker = base / TRACKER
    candidates = list_checkpoints(base)
    if not tracker.exists() and not candidates:
        return None
    wanted = None
    if tracker.exists():
        try:
            wanted = int(tracker.read_text().strip())
        except ValueError:
            log(f"checkpoint tracker {tracker} is unreadable; looking for complete checkpoints")
    order = sorted(candidates, reverse=True)
    if wanted is not None:
        order = [wanted] + [i for i in order if i < wanted]
    for iteration in order:
        if iteration in exclude:
            continue
        path = iteration_dir(base, iteration)
        problem = _verify_together(path)
        if problem is None:
            if (iteration != wanted and wanted is not None) or exclude:
                log(f"resuming from the previous complete checkpoint {path}")
            return path
        log(f"skipping damaged checkpoint: {problem}")
    raise CheckpointError(
        f"{root}: holds checkpoints but none is usable (see above); refusing to start from "
        "scratch. Move the directory away to start a new run."
    )


def _ensure_adam_state(optimizer: Any) -> None:
    """Give a fresh torch Adam/AdamW its zero state before loading into it.

    megatron-core 0.16.1's distributed optimizer reads the inner optimizer's 'step' to build
    its load template and fails on an optimizer that has never stepped, which is what the
    torch fallback (no Transformer Engine or apex) is at resume time.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}  # fmt: skip


def _skip_adam_step_on_copy(optimizer: Any) -> None:
    """megatron-core 0.16.1, distributed optimizer over torch's Adam: the fully reshardable
    load copies every entry of a parameter's Adam state, 'step' included, from the loaded
    tensors, which keep 'step' elsewhere (KeyError). Leave 'step' out of that copy; it is
    restored from the optimizer's common state."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states

        def copy_without_step(model_param: Any, tensors: dict, opt: Any = opt,
                              original: Any = original) -> None:  # fmt: skip
            group, order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            step = state.pop("step", None)
            original(model_param, tensors)
            if step is not None:
                state["step"] = step

        opt._set_main_param_and_optimizer_states = copy_without_step


def _unshare_adam_steps(optimizer: Any) -> None:
    """megatron-core 0.16.1 restores torch Adam's per-parameter 'step' as one tensor shared by
    every parameter; torch increments it in place once per parameter, which corrupts the
    bias correction after a resume. Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def load_checkpoint(
    path: Path, model: list[Any], optimizer: Any | None, scheduler: Any | None,
    load_optimizer: bool = True,
) -> TrainState:  # fmt: skip
    """Load model (and optimizer, scheduler, RNG when the layout matches) from ``path``."""
    manifest = json.loads((path / MANIFEST).read_text())
    same_layout = manifest.get("layout") == _layout()
    opt = optimizer if load_optimizer else None
    if opt is not None:
        _ensure_adam_state(opt)
        _skip_adam_step_on_copy(opt)
    template = sharded_state(model, opt, scheduler if load_optimizer else None, TrainState(),
                             is_loading=True, with_rng=same_layout)  # fmt: skip
    loaded = dist_checkpointing.load(template, str(path))
    model = unwrap_model(model)
    if len(model) == 1:
        model[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(model):
            chunk.load_state_dict(loaded[f"model{i}"])
    if opt is not None:
        opt.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(opt)
    if load_optimizer and scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout and "rng_state" in loaded:
        rng = loaded["rng_state"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return TrainState(**loaded["train_state"]) if load_optimizer else TrainState()


def load_latest_checkpoint(
    root: str, model: list[Any], optimizer: Any, scheduler: Any, log: Any,
) -> tuple[Path | None, TrainState]:  # fmt: skip
    """Resume from the newest usable checkpoint under ``root`` (collective).

    A checkpoint that verifies but still fails to load, for any reason and on any rank, is
    reported and the previous complete one is tried, as for a damaged file. Returns
    (None, a fresh state) when ``root`` holds no checkpoint; raises CheckpointError when it
    holds some but none loads.
    """
    failed: set[int] = set()
    while True:
        path = find_resume_checkpoint(root, log, frozenset(failed))
        if path is None:
            return None, TrainState()
        log(f"resuming from {path}")
        error = None
        try:
            state = load_checkpoint(path, model, optimizer, scheduler)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - torch's CheckpointException is one
            error = f"{type(err).__name__}: {err}"
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        bad = [(rank, e) for rank, e in enumerate(errors) if e]
        if not bad:
            return path, state
        rank, first = bad[0]
        log(f"skipping checkpoint that failed to load: {path} (rank {rank}: "
            f"{first.splitlines()[0][:300]}); falling back to the previous complete checkpoint")
        failed.add(int(path.name[len("iter_"):]))
