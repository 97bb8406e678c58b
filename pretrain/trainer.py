"""The training run: set-up, resume, the loop, checkpoints, validation, stopping."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from mm_megatron.checkpoint import format as fmt
from mm_megatron.config_loading import ConfigError, to_mapping
from mm_megatron.model import init_model_parallel
from pretrain import checkpointing as ckpt
from pretrain import ckpt_space as space
from pretrain import dataset_ranks, resume_guard, retention
from pretrain.bad_batches import BadBatchGuard
from pretrain.components import Components, configure_compile
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
    return [
        dataset_ranks.wrap_stream(  # TP rank 0 reads, the others receive
            lambda: BatchStream(dataset, mbs, dp_rank, dp_size, consumed, device),
            dataset,
            mbs,
            cfg.model.seq_length,
            device,
        )
        for _ in range(chunks)
    ]


def _require_final_iteration(source: Path) -> None:
    """Refuse to initialise from a checkpoint that is not the final one of its run."""
    from pretrain.config import load_train_config

    done = fmt.read_manifest(source)["iteration"]
    try:
        total = load_train_config(str(source / fmt.RUN_CONFIG)).train_iters
    except (ConfigError, OSError) as err:
        raise ConfigError(
            f"checkpoint.init_from: cannot read the config saved with {source} "
            f"({err}); set checkpoint.init_from_unfinished=true to use it"
        ) from None
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
    beat_dir = r.heartbeat_dir or (
        str(Path(cfg.logging.dir) / "heartbeat") if cfg.logging.dir else None
    )
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


def _init_weights_from(cfg: Config, model: list) -> None:
    """Load the model weights (only) of the checkpoint ``checkpoint.init_from`` names."""
    source = ckpt.find_resume_checkpoint(cfg.checkpoint.init_from, log0)
    if source is None:
        raise ConfigError(f"checkpoint.init_from: no checkpoint in {cfg.checkpoint.init_from}")
    if not cfg.checkpoint.init_from_unfinished:
        _require_final_iteration(source)
    log0(f"initialising model weights from {source}")
    ckpt.load_checkpoint(source, model, None, None, load_optimizer=False)


def _write_run_files(cfg: Config, root: str | None, tok: Any, resolved: dict[str, Any]) -> None:
    """Rank 0: the tokenizer's files beside the checkpoints, the resolved config in the logs."""
    if root and dist.get_rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        if tok is not None:
            (Path(root) / fmt.TOKENIZER_DIR).mkdir(exist_ok=True)
            for f in tok.files():
                shutil.copy2(f, Path(root) / fmt.TOKENIZER_DIR / Path(f).name)
    if cfg.logging.dir and dist.get_rank() == 0:
        Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(resolved, sort_keys=False)
        (Path(cfg.logging.dir) / fmt.RUN_CONFIG).write_text(text)


class Trainer:
    """One training run: everything is set up once by the constructor, then :meth:`train`
    runs the loop to ``train.iters`` or a stop.

    Set-up, in this order: compile guards and the checkpoint writer helpers; the inputs
    checked (data prefixes, tokenizer, provenance) before any heavy work; the parallel groups;
    the model chunks, optimizer and schedule (:class:`pretrain.components.Components`);
    resume from this run's latest checkpoint (with the resume guard) or initialise the weights
    from ``checkpoint.init_from``; the checkpoint directory (stale saves removed, space
    checked) and the run files; the data streams; stopping, metrics, asynchronous saves and
    the hang watchdog.
    """

    def __init__(self, cfg: Config, world_size: int, device: torch.device) -> None:
        self.start_time = time.monotonic()
        self.cfg, self.device = cfg, device
        configure_compile()
        self.resolved = resolved = to_mapping(cfg)
        self.root = root = cfg.checkpoint.dir
        if root:
            ckpt.start_writer_helpers()  # before any stop signal can reach a fresh helper
        if not cfg.data.mock:
            check_blends_exist(cfg)
        self.tokenizer, self.tok = load_run_tokenizer(cfg)
        if self.tok is not None:
            check_run_data(cfg, self.tok, log0)  # provenance and blend plan, before heavy work
        self.num_micro = cfg.num_microbatches(world_size)
        init_model_parallel(cfg.parallel, cfg.train.seed)
        self._log_layout(world_size)

        self.parts = Components.build(cfg, device)
        self.state, resumed = self._load_checkpoint()
        if root:
            _prepare_checkpoint_dir(root, cfg.checkpoint.keep_last, self.parts.model)
        _write_run_files(cfg, root, self.tok, resolved)

        self.total = cfg.train_iters
        self.gbs = cfg.train.global_batch_size
        evals = (self.total // cfg.logging.eval_interval + 1) if cfg.logging.eval_interval else 0
        self.train_ds, self.valid_ds, _ = dataset_ranks.build_on_needed_ranks(
            build_datasets,
            cfg,
            self.tokenizer,
            [self.total * self.gbs, evals * cfg.logging.eval_iters * self.gbs, 0],
            log=log0,
        )
        self.train_it = self._streams(self.train_ds, self.state.consumed_train_samples)
        r = cfg.runtime
        self.stopper = StopController(r.stop_file, r.exit_duration_minutes, r.exit_interval, device)
        self.metrics = MetricsLogger(cfg, world_size, dist.get_rank(), cfg.logging.dir, resolved)
        self.async_queue = None
        if root and cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        self.last_saved = self.state.iteration if resumed else -1
        self.watchdog = _make_watchdog(cfg)

    def _log_layout(self, world_size: int) -> None:
        """Rank 0: the resolved config, the parallel layout and the batch split."""
        cfg, p = self.cfg, self.cfg.parallel
        log0("resolved config:\n" + yaml.safe_dump(self.resolved, sort_keys=False).rstrip())
        log0(
            f"world {world_size}: tp {p.tensor_model_parallel_size} pp "
            f"{p.pipeline_model_parallel_size} dp "
            f"{parallel_state.get_data_parallel_world_size()}, {self.num_micro} micro-batches "
            f"of {cfg.train.micro_batch_size}, {cfg.train_iters} iterations"
        )

    def _load_checkpoint(self) -> tuple[ckpt.TrainState, bool]:
        """Resume from this run's latest checkpoint, else take the weights of
        ``checkpoint.init_from`` if set; the train state and whether this run resumed."""
        cfg, parts = self.cfg, self.parts
        state = ckpt.TrainState()
        retention.configure(cfg.checkpoint.milestone_interval)
        resume = None
        if self.root:
            resume, state = ckpt.load_latest_checkpoint(
                self.root, parts.model, parts.optimizer, parts.scheduler, log0
            )
        if resume is not None:
            resume_guard.guard_resume(
                resume, cfg, self.resolved, self.tok, parts.optimizer, parts.scheduler, log0
            )
        elif cfg.checkpoint.init_from:
            _init_weights_from(cfg, parts.model)
        return state, resume is not None

    def _streams(self, dataset: Any, consumed: int) -> list:
        """This rank's streams of ``dataset`` from sample ``consumed``, one per model chunk."""
        return _streams(dataset, self.cfg, consumed, len(self.parts.model), self.device)

    def save(self, final: bool = False) -> None:
        """Save a checkpoint of the current step unless already saved (the watchdog paused);
        ``final``: also wait for the asynchronous saves to finish."""
        if self.watchdog is not None:
            self.watchdog.pause()
        try:
            self._save(final)
        finally:
            if self.watchdog is not None:
                self.watchdog.resume()

    def _save(self, final: bool) -> None:
        state, parts, queue = self.state, self.parts, self.async_queue
        if self.root and self.last_saved != state.iteration:
            self.last_saved = state.iteration
            t0 = time.perf_counter()
            with params_synced(parts.model):  # complete parameters under overlap_param_gather
                path = ckpt.save_checkpoint(
                    self.root,
                    parts.model,
                    parts.optimizer,
                    parts.scheduler,
                    state,
                    self.resolved,
                    self.cfg.checkpoint.keep_last,
                    queue,
                )
            verb = "scheduled asynchronous save of" if queue else "saved"
            log0(f"{verb} checkpoint {path} in {time.perf_counter() - t0:.1f} s")
        if queue is not None and final:
            queue.maybe_finalize_async_calls(blocking=True)
            log0("asynchronous checkpoint saves finished")

    def train(self) -> int:
        """Train to ``train.iters`` or a stop; returns the process exit status (see
        :mod:`pretrain.stopping`)."""
        cfg, state = self.cfg, self.state
        self.start_iteration = state.iteration
        guard = BadBatchGuard(cfg.train, log0)
        telemetry = Telemetry(cfg.logging.telemetry_interval, self.parts.model, self.metrics)
        profiler = StepProfiler(cfg, dist.get_rank())
        status = None
        try:
            while status is None and state.iteration < self.total:
                status = self._stop_status()
                if status is None:
                    status = self._step(guard, telemetry, profiler)
            if status is None:
                self.save(final=True)
                log0(
                    f"training finished at step {state.iteration} in "
                    f"{time.monotonic() - self.start_time:.1f} s"
                )
                status = EXIT_DONE
        finally:
            self._close(profiler)
        return status

    def _stop_status(self) -> int | None:
        """EXIT_REQUEUE when the ranks agree to stop (saving first if a step ran), else None."""
        state = self.state
        reason = self.stopper.agreed_reason(state.iteration - self.start_iteration)
        if reason and state.iteration == self.start_iteration:
            # Nothing trained since the start: nothing new to save.
            log0(
                f"stop requested ({reason}) before the first step of this start (step "
                f"{state.iteration}): exiting with status {EXIT_REQUEUE} without saving"
            )
            return EXIT_REQUEUE
        if reason:
            log0(
                f"stop requested ({reason}) at step {state.iteration}: saving and exiting "
                f"with status {EXIT_REQUEUE} to be requeued"
            )
            self.save(final=True)
            return EXIT_REQUEUE
        return None

    def _step(
        self, guard: BadBatchGuard, telemetry: Telemetry, profiler: StepProfiler
    ) -> int | None:
        """One training step and what follows it; EXIT_FAILED on a non-finite loss or
        gradient norm, else None."""
        cfg, state, parts, train_it = self.cfg, self.state, self.parts, self.train_it
        step = state.iteration + 1
        waits = sum(s.wait_seconds for s in train_it)
        telemetry.arm(step)
        profiler.step_start(step)
        values = guard.run_step(
            step,
            train_it,
            self.num_micro,
            lambda: train_step(
                cfg, parts.model, parts.optimizer, parts.scheduler, train_it, self.num_micro, step
            ),
        )
        profiler.step_end(step)
        if not values.get("skipped") and not (
            math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
        ):
            log0(
                f"error: non-finite loss {values['loss']} or grad norm "
                f"{values['grad_norm']} at step {step}; stopping without "
                "saving (resume from the last checkpoint, e.g. with a lower LR)"
            )
            return EXIT_FAILED
        state.iteration += 1
        state.consumed_train_samples += self.gbs
        if self.watchdog is not None:
            self.watchdog.beat(state.iteration)
        if state.iteration == self.start_iteration + 1:
            _after_first_step(cfg, self.watchdog)
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=False)
        self.metrics.step_done(sum(s.wait_seconds for s in train_it) - waits)
        telemetry.collect(state.iteration)
        if state.iteration % cfg.logging.interval == 0 or state.iteration == self.total:
            self.metrics.log(state.iteration, self.total, values)
        if (
            cfg.logging.eval_interval
            and self.valid_ds is not None
            and (state.iteration % cfg.logging.eval_interval == 0 or state.iteration == self.total)
        ):
            self._validate()
        with self.metrics.excluded():  # an evaluation: not part of the step time
            log_position_loss(cfg, parts.model, state.iteration, self.metrics.writer)
        if state.iteration % cfg.checkpoint.interval == 0 and state.iteration < self.total:
            with self.metrics.excluded():
                self.save()
        return None

    def _validate(self) -> None:
        """The validation loss on ``logging.eval_iters`` fresh global batches (the watchdog
        paused, the time excluded from the step time)."""
        cfg, state = self.cfg, self.state
        valid_it = self._streams(self.valid_ds, state.consumed_valid_samples)
        if self.watchdog is not None:
            self.watchdog.pause()
        with self.metrics.excluded():  # not part of the step time
            loss = evaluate(cfg, self.parts.model, valid_it, self.num_micro)
        if self.watchdog is not None:
            self.watchdog.resume()
        state.consumed_valid_samples += cfg.logging.eval_iters * self.gbs
        self.metrics.log_validation(state.iteration, loss)

    def _close(self, profiler: StepProfiler) -> None:
        """Stop the profiler and watchdog, wait for asynchronous saves, close the metrics."""
        profiler.close()
        if self.watchdog is not None:
            self.watchdog.pause()
            self.watchdog.stop()
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)
            self.async_queue.close()
        self.metrics.close()


def run(cfg: Config, world_size: int, device: torch.device) -> int:
    """Train as configured; returns the process exit status (see pretrain.stopping)."""
    return Trainer(cfg, world_size, device).train()
