"""The training run: set-up, resume, the loop, checkpoints, validation, stopping."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from mm_megatron.config_loading import ConfigError, to_mapping
from pretrain import checkpointing as ckpt
from pretrain import ckpt_space as space
from pretrain import dataset_ranks, resume_guard, retention
from pretrain.bad_batches import BadBatchGuard
from pretrain.components import Components, configure_compile, init_model_parallel
from pretrain.config import Config
from pretrain.data import BatchStream, TokenizerView, build_datasets, check_blends_exist
from pretrain.data_plan import check_run_data
from pretrain.distributed import set_collective_timeout
from pretrain.metrics import MetricsLogger
from pretrain.perf import params_synced
from pretrain.position_log import log_position_loss
from pretrain.profiler import StepProfiler
from pretrain.steps import evaluate, train_step
from pretrain.stopping import EXIT_DONE, EXIT_FAILED, EXIT_REQUEUE, StopController
from pretrain.telemetry import Telemetry
from pretrain.watchdog import Watchdog


def log0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def load_run_tokenizer(cfg: Config) -> tuple[TokenizerView, Any]:
    if cfg.data.mock:
        return TokenizerView(vocab_size=cfg.model.vocab_size, eod=cfg.model.vocab_size - 1), None
    from mm_megatron.data.tokenizers import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except TokenizerError as err:
        raise ConfigError(f"data.tokenizer: {err}") from None
    if tok.eos_id is None:
        raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer} has no end-of-text token")
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tok.vocab_size}, {cfg.data.tokenizer})"
        )
    return TokenizerView(vocab_size=tok.vocab_size, eod=tok.eos_id), tok


def _streams(dataset: Any, cfg: Config, consumed: int, chunks: int, device: torch.device) -> list:
    """One identical stream per model chunk (the interleaved schedule reads one per chunk)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mbs = cfg.train.micro_batch_size
    return [dataset_ranks.wrap_stream(  # TP rank 0 reads, the others receive
        lambda: BatchStream(dataset, mbs, dp_rank, dp_size, consumed, device), dataset, mbs,
        cfg.model.seq_length, device) for _ in range(chunks)]  # fmt: skip


def _require_final_iteration(source: Path) -> None:
    """Refuse to initialise from a checkpoint that is not the final one of its run."""
    from pretrain.config import load_train_config

    done = json.loads((source / ckpt.MANIFEST).read_text())["iteration"]
    try:
        total = load_train_config(str(source / "config.yaml")).train_iters
    except (ConfigError, OSError) as err:
        raise ConfigError(f"checkpoint.init_from: cannot read the config saved with {source} "
                          f"({err}); set checkpoint.init_from_unfinished=true to use it") from None
    if done < total:
        raise ConfigError(
            f"checkpoint.init_from: {source} is iteration {done} of {total}: the run that saved "
            "it has not finished. Start this stage after it (sbatch --dependency=afterok:<its "
            "job id> ...), or set checkpoint.init_from_unfinished=true to use it anyway"
        )


def _prepare_checkpoint_dir(root: str, keep_last: int | None, model: list) -> None:
    """Remove unpublished saves of earlier starts; check there is room for the checkpoints
    this run keeps (collective; raises ckpt_space.CheckpointSpaceError, a final error)."""
    if dist.get_rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        removed = space.remove_stale_tmp(root)
        if removed:
            log0(f"removed unpublished checkpoint directories of earlier starts: {removed}")
    dist.barrier()
    log0(space.check_space(root, keep_last, model))


def _make_watchdog(cfg: Config) -> Watchdog | None:
    """The hang watchdog of this rank (started after the first step), or None when off."""
    r = cfg.runtime
    if r.hang_minutes is None:
        return None
    beat_dir = r.heartbeat_dir or (str(Path(cfg.logging.dir) / "heartbeat")
                                   if cfg.logging.dir else None)  # fmt: skip
    if beat_dir and dist.get_rank() == 0:  # heartbeats of an earlier start mean nothing now
        for old in Path(beat_dir).glob("rank_*.json"):
            old.unlink(missing_ok=True)
    return Watchdog(60 * r.hang_minutes, dist.get_rank(), beat_dir, dist.get_world_size())


def _after_first_step(cfg: Config, watchdog: Watchdog | None) -> None:
    """Shorten the collective timeout and start the watchdog once a step has run."""
    minutes = cfg.runtime.step_timeout_minutes
    if minutes is not None:
        groups = set_collective_timeout(minutes)
        log0(f"collective timeout now {minutes:g} min ({groups} process groups)")
    if watchdog is not None:
        watchdog.start()
        log0(f"hang watchdog on: {cfg.runtime.hang_minutes:g} min without step progress")


def run(cfg: Config, world_size: int, device: torch.device) -> int:
    """Train as configured; returns the process exit status (see pretrain.stopping)."""
    start_time = time.monotonic()
    configure_compile()
    resolved = to_mapping(cfg)
    if cfg.checkpoint.dir:
        ckpt.start_writer_helpers()  # before any stop signal can reach a fresh helper
    if not cfg.data.mock:
        check_blends_exist(cfg)
    tokenizer, tok = load_run_tokenizer(cfg)
    if tok is not None:
        check_run_data(cfg, tok, log0)  # provenance and blend plan, before any heavy work
    num_micro = cfg.num_microbatches(world_size)
    p = cfg.parallel
    init_model_parallel(p, cfg.train.seed)
    log0("resolved config:\n" + yaml.safe_dump(resolved, sort_keys=False).rstrip())
    log0(f"world {world_size}: tp {p.tensor_model_parallel_size} pp "
         f"{p.pipeline_model_parallel_size} dp {parallel_state.get_data_parallel_world_size()}, "
         f"{num_micro} micro-batches of {cfg.train.micro_batch_size}, "
         f"{cfg.train_iters} iterations")  # fmt: skip

    parts = Components.build(cfg, device)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    state = ckpt.TrainState()
    root = cfg.checkpoint.dir
    retention.configure(cfg.checkpoint.milestone_interval)
    resume = None
    if root:
        resume, state = ckpt.load_latest_checkpoint(root, model, optimizer, scheduler, log0)
    if resume is not None:
        resume_guard.guard_resume(resume, cfg, resolved, tok, optimizer, scheduler, log0)
    if resume is None and cfg.checkpoint.init_from:
        source = ckpt.find_resume_checkpoint(cfg.checkpoint.init_from, log0)
        if source is None:
            raise ConfigError(f"checkpoint.init_from: no checkpoint in {cfg.checkpoint.init_from}")
        if not cfg.checkpoint.init_from_unfinished:
            _require_final_iteration(source)
        log0(f"initialising model weights from {source}")
        ckpt.load_checkpoint(source, model, None, None, load_optimizer=False)
    if root:
        _prepare_checkpoint_dir(root, cfg.checkpoint.keep_last, model)
    if root and dist.get_rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        if tok is not None:
            (Path(root) / "tokenizer").mkdir(exist_ok=True)
            for f in tok.files():
                shutil.copy2(f, Path(root) / "tokenizer" / Path(f).name)
    if cfg.logging.dir and dist.get_rank() == 0:
        Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(resolved, sort_keys=False)
        (Path(cfg.logging.dir) / "config.yaml").write_text(text)

    total = cfg.train_iters
    evals = (total // cfg.logging.eval_interval + 1) if cfg.logging.eval_interval else 0
    gbs = cfg.train.global_batch_size
    train_ds, valid_ds, _ = dataset_ranks.build_on_needed_ranks(
        build_datasets, cfg, tokenizer, [total * gbs, evals * cfg.logging.eval_iters * gbs, 0],
        log=log0)
    chunks = len(model)
    train_it = _streams(train_ds, cfg, state.consumed_train_samples, chunks, device)
    r = cfg.runtime
    stopper = StopController(r.stop_file, r.exit_duration_minutes, r.exit_interval, device)
    metrics = MetricsLogger(cfg, world_size, dist.get_rank(), cfg.logging.dir, resolved)

    async_queue = None
    if root and cfg.checkpoint.async_save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        async_queue = AsyncCallsQueue()

    last_saved = state.iteration if resume is not None else -1
    watchdog = _make_watchdog(cfg)

    def save(final: bool = False) -> None:
        if watchdog is not None:
            watchdog.pause()
        try:
            _save(final)
        finally:
            if watchdog is not None:
                watchdog.resume()

    def _save(final: bool) -> None:
        nonlocal last_saved
        if root and last_saved != state.iteration:
            last_saved = state.iteration
            t0 = time.perf_counter()
            with params_synced(model):  # complete parameters under overlap_param_gather
                path = ckpt.save_checkpoint(root, model, optimizer, scheduler, state, resolved,
                                            cfg.checkpoint.keep_last, async_queue)  # fmt: skip
            verb = "scheduled asynchronous save of" if async_queue else "saved"
            log0(f"{verb} checkpoint {path} in {time.perf_counter() - t0:.1f} s")
        if async_queue is not None and final:
            async_queue.maybe_finalize_async_calls(blocking=True)
            log0("asynchronous checkpoint saves finished")

    status = EXIT_DONE
    start_iteration = state.iteration
    guard = BadBatchGuard(cfg.train, log0)
    telemetry = Telemetry(cfg.logging.telemetry_interval, model, metrics)
    profiler = StepProfiler(cfg, dist.get_rank())
    try:
        while state.iteration < total:
            reason = stopper.agreed_reason(state.iteration - start_iteration)
            if reason and state.iteration == start_iteration:
                # Nothing trained since the start: nothing new to save.
                log0(f"stop requested ({reason}) before the first step of this start (step "
                     f"{state.iteration}): exiting with status {EXIT_REQUEUE} without saving")
                status = EXIT_REQUEUE
                break
            if reason:
                log0(f"stop requested ({reason}) at step {state.iteration}: saving and exiting "
                     f"with status {EXIT_REQUEUE} to be requeued")  # fmt: skip
                save(final=True)
                status = EXIT_REQUEUE
                break
            waits = sum(s.wait_seconds for s in train_it)
            telemetry.arm(state.iteration + 1)
            profiler.step_start(state.iteration + 1)
            values = guard.run_step(state.iteration + 1, train_it, num_micro, lambda: train_step(
                cfg, model, optimizer, scheduler, train_it, num_micro, state.iteration + 1))
            profiler.step_end(state.iteration + 1)
            if not values.get("skipped") and not (
                math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
                log0(f"error: non-finite loss {values['loss']} or grad norm "
                     f"{values['grad_norm']} at step {state.iteration + 1}; stopping without "
                     "saving (resume from the last checkpoint, e.g. with a lower LR)")  # fmt: skip
                status = EXIT_FAILED
                break
            state.iteration += 1
            state.consumed_train_samples += gbs
            if watchdog is not None:
                watchdog.beat(state.iteration)
            if state.iteration == start_iteration + 1:
                _after_first_step(cfg, watchdog)
            if async_queue is not None:
                async_queue.maybe_finalize_async_calls(blocking=False)
            metrics.step_done(sum(s.wait_seconds for s in train_it) - waits)
            telemetry.collect(state.iteration)
            if state.iteration % cfg.logging.interval == 0 or state.iteration == total:
                metrics.log(state.iteration, total, values)
            if cfg.logging.eval_interval and valid_ds is not None and (
                state.iteration % cfg.logging.eval_interval == 0 or state.iteration == total
            ):
                valid_it = _streams(valid_ds, cfg, state.consumed_valid_samples, chunks, device)
                if watchdog is not None:
                    watchdog.pause()
                with metrics.excluded():  # not part of the step time
                    loss = evaluate(cfg, model, valid_it, num_micro)
                if watchdog is not None:
                    watchdog.resume()
                state.consumed_valid_samples += cfg.logging.eval_iters * gbs
                metrics.log_validation(state.iteration, loss)
            with metrics.excluded():  # an evaluation: not part of the step time
                log_position_loss(cfg, model, state.iteration, metrics.writer)
            if state.iteration % cfg.checkpoint.interval == 0 and state.iteration < total:
                with metrics.excluded():
                    save()
        else:
            save(final=True)
            log0(f"training finished at step {state.iteration} in "
                 f"{time.monotonic() - start_time:.1f} s")  # fmt: skip
    finally:
        profiler.close()
        if watchdog is not None:
            watchdog.pause()
            watchdog.stop()
        if async_queue is not None:
            async_queue.maybe_finalize_async_calls(blocking=True)
            async_queue.close()
        metrics.close()
    return status
