"""Training checkpoints: the atomic save with retention and space checks, and safe resume.

The directory format (tracker, ``iter_XXXXXXX/``, manifest, ``config.yaml``) is
:mod:`mm_megatron.checkpoint.format`'s; the atomic, hashed save is
:mod:`mm_megatron.checkpoint.sharded`'s. Here the training run adds retention and a clear
error when the disk is full. Resume checks the manifest against the files on disk before
loading (sizes on every rank, hashes shared out across the ranks) and falls back to the
previous complete checkpoint, saying why, if the latest one is damaged or fails to load for
any reason.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from mm_megatron.checkpoint import format as fmt
from mm_megatron.checkpoint import sharded
from mm_megatron.checkpoint.sharded import TrainState
from pretrain import ckpt_space as space
from pretrain import retention
from pretrain.stopping import helper_initializer, stop_signals_blocked


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


def save_checkpoint(
    root: str,
    model: list[Any],
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    config_dict: dict[str, Any],
    keep_last: int | None,
    async_queue: Any = None,
) -> Path:
    """Save atomically (:func:`mm_megatron.checkpoint.sharded.save_checkpoint`; collective),
    then apply retention (``keep_last``); a save that fails for want of space raises
    ``ckpt_space.CheckpointSpaceError``."""

    def out_of_space(err: BaseException, tmp: Path) -> None:
        if space.is_out_of_space(err) or space.looks_full(root, tmp):
            raise space.out_of_space_error(root, tmp) from err

    def retain(base: Path, iteration: int) -> None:
        _apply_retention(base, keep_last, iteration)

    return sharded.save_checkpoint(
        root,
        model,
        optimizer,
        scheduler,
        state,
        config_dict,
        async_queue,
        on_published=retain,
        on_save_error=out_of_space,
    )


def _apply_retention(root: Path, keep_last: int | None, newest: int) -> None:
    space.remove_stale_tmp(str(root), below=newest)  # saves that never published
    retention.schedule(root, keep_last, newest, fmt.list_checkpoints, _log_flush)  # off the step


def _log_flush(message: str) -> None:
    print(message, flush=True)


def _verify_together(path: Path) -> str | None:
    """verify_checkpoint shared out across the ranks (collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fmt.verify_checkpoint(path)
    problem = fmt.verify_checkpoint(path, (dist.get_rank(), dist.get_world_size()))
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problem)
    return next((p for p in gathered if p), None)


def find_resume_checkpoint(
    root: str, log: Any, exclude: frozenset[int] = frozenset()
) -> Path | None:
    """The checkpoint to resume from: the tracker's, or the newest verified one before it.

    None when ``root`` holds no checkpoint at all (a fresh start). Raises CheckpointError if
    checkpoints exist but none is usable, rather than silently starting from scratch.
    Iterations in ``exclude`` (which failed to load) are skipped. Collective when the
    process group is initialised (the ranks share the hashing).
    """
    base = Path(root)
    tracker = base / fmt.TRACKER
    candidates = fmt.list_checkpoints(base)
    if not tracker.exists() and not candidates:
        return None
    wanted = None
    if tracker.exists():
        try:
            wanted = fmt.read_tracker(base)
        except ValueError:
            log(f"checkpoint tracker {tracker} is unreadable; looking for complete checkpoints")
    order = sorted(candidates, reverse=True)
    if wanted is not None:
        order = [wanted] + [i for i in order if i < wanted]
    for iteration in order:
        if iteration in exclude:
            continue
        path = fmt.iteration_dir(base, iteration)
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
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p.data),
                        "exp_avg_sq": torch.zeros_like(p.data),
                    }


def _skip_adam_step_on_copy(optimizer: Any) -> None:
    """megatron-core 0.16.1, distributed optimizer over torch's Adam: the fully reshardable
    load copies every entry of a parameter's Adam state, 'step' included, from the loaded
    tensors, which keep 'step' elsewhere (KeyError). Leave 'step' out of that copy; it is
    restored from the optimizer's common state."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states

        def copy_without_step(
            model_param: Any, tensors: dict, opt: Any = opt, original: Any = original
        ) -> None:
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
    path: Path,
    model: list[Any],
    optimizer: Any | None,
    scheduler: Any | None,
    load_optimizer: bool = True,
) -> TrainState:
    """Load model (and optimizer, scheduler, RNG when the layout matches) from ``path``."""
    manifest = fmt.read_manifest(path)
    same_layout = manifest.get("layout") == sharded.current_layout()
    opt = optimizer if load_optimizer else None
    if opt is not None:
        _ensure_adam_state(opt)
        _skip_adam_step_on_copy(opt)
    template = sharded.sharded_state(
        model,
        opt,
        scheduler if load_optimizer else None,
        TrainState(),
        is_loading=True,
        with_rng=same_layout,
    )
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
    root: str,
    model: list[Any],
    optimizer: Any,
    scheduler: Any,
    log: Any,
) -> tuple[Path | None, TrainState]:
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
        log(
            f"skipping checkpoint that failed to load: {path} (rank {rank}: "
            f"{first.splitlines()[0][:300]}); falling back to the previous complete checkpoint"
        )
        failed.add(fmt.iteration_of(path))
