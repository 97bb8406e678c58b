"""Training metrics: a concise stdout line per log interval, TensorBoard scalars and,
optionally, Weights & Biases (:mod:`pretrain.wandb_logger`).

The step time (and so tokens/s, TFLOP/s and MFU) of a window excludes the time spent in
:meth:`MetricsLogger.excluded` blocks (validation, checkpoint saves), reported separately as
``excluded_s``; ``data_wait_s`` is the data loader's wait per step.

Throughput and MFU use the MM-specific FLOP count of mm_megatron.flops (the training-step
convention), never a transformer formula applied to MM v2.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import psutil
import torch

from mm_megatron.flops import training_flops_per_token


class MetricsLogger:
    def __init__(
        self,
        cfg: Any,
        world_size: int,
        rank: int,
        log_dir: str | None,
        resolved_config: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.world_size = world_size
        self.is_writer = rank == 0
        self.flops_per_token = training_flops_per_token(cfg.model)
        self.writer = None
        if self.is_writer and log_dir and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)
        self.wandb = None
        if self.is_writer and cfg.logging.wandb_project:
            from pretrain.wandb_logger import WandbLogger

            self.wandb = WandbLogger(cfg, resolved_config or {})
        self._window_start = time.perf_counter()
        self._window_iters = 0
        self._window_data_wait = 0.0
        self._window_excluded = 0.0

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside is not part of the step time (validation, checkpoints)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._window_excluded += time.perf_counter() - start

    def step_done(self, data_wait: float) -> None:
        self._window_iters += 1
        self._window_data_wait += data_wait

    def log(self, iteration: int, total: int, values: dict[str, float]) -> None:
        """Print and record the window since the last call (rank 0 only)."""
        excluded = self._window_excluded
        elapsed = max(time.perf_counter() - self._window_start - excluded, 1e-9)
        iters = max(self._window_iters, 1)
        step_time = elapsed / iters
        tokens_per_s = self.cfg.tokens_per_iter / step_time
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        values = dict(values)
        values.update(
            {
                "step_time_s": step_time,
                "tokens_per_s": tokens_per_s,
                "tflops_per_device": tflops,
                "data_wait_s": self._window_data_wait / iters,
                "memory_gib": _memory_gib(),
                "excluded_s": excluded,
            }
        )
        if self.cfg.logging.peak_tflops:
            values["mfu"] = tflops / self.cfg.logging.peak_tflops
        self._window_start, self._window_iters, self._window_data_wait = time.perf_counter(), 0, 0.0
        self._window_excluded = 0.0
        if not self.is_writer:
            return
        parts = [
            f"step {iteration}/{total}",
            f"loss {values['loss']:.4f}",
            f"lr {values['lr']:.3e}",
            f"grad norm {values['grad_norm']:.3f}",
            f"loss scale {values['loss_scale']:.3g}",
            f"{step_time * 1000:.0f} ms/step",
            f"{tokens_per_s:,.0f} tok/s",
            f"{tflops:.3g} TFLOP/s/dev",
        ]
        if "mfu" in values:
            parts.append(f"MFU {100 * values['mfu']:.1f}%")
        parts += [
            f"m {values['ltm_offset']:.0f}",
            f"mem {values['memory_gib']:.2f} GiB",
            f"data {1000 * values['data_wait_s']:.0f} ms",
        ]
        print(" | ".join(parts), flush=True)
        if self.writer:
            for key, value in values.items():
                if isinstance(value, float | int) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, iteration)
            self.writer.flush()
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, iteration)

    def log_telemetry(
        self, iteration: int, scalars: dict[str, float], histograms: dict[str, list[float]]
    ) -> None:
        """Per-layer model statistics (rank 0): scalars and per-head histograms."""
        if not self.is_writer:
            return
        if self.writer:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)
            for tag, values in histograms.items():
                self.writer.add_histogram(tag, torch.tensor(values), iteration)
            self.writer.flush()
        if self.wandb:
            self.wandb.log(scalars, iteration)

    def log_validation(self, iteration: int, loss: float) -> None:
        if not self.is_writer:
            return
        ppl = math.exp(min(loss, 50))
        print(f"validation at step {iteration} | loss {loss:.4f} | ppl {ppl:.2f}", flush=True)
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, iteration)
            self.writer.flush()
        if self.wandb:
            self.wandb.log({"valid/loss": loss, "valid/ppl": ppl}, iteration)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.close()


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30
