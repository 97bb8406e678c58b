"""Bad batches: skip a bounded number of non-finite steps, skip listed iterations, and
log loss spikes.

* ``train.skip_bad_batches: N``. :func:`grads_finite` checks the loss and every gradient
  (all ranks agree through one all-reduce) *before* the optimizer step. A bad batch then
  gets no update: model, optimizer and LR schedule stay as if it had never been seen, and
  its samples count as consumed. Up to N such batches are skipped and logged over the run;
  the next one stops the run with status 1, as any bad batch does with N = 0.
* ``train.iterations_to_skip: [i, ...]``: the batch of iteration i is read and dropped,
  without a forward pass (Megatron-LM's ``--iterations-to-skip``).
* ``train.spike_factor`` / ``train.spike_window``: a step whose loss exceeds the factor
  times the mean of the previous window is logged as a spike (nothing else happens).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def grads_finite(loss: float, model: list[Any]) -> bool:
    """Whether the loss and every rank's gradients are finite (collective over all ranks)."""
    ok = math.isfinite(loss)
    if ok:
        for chunk in model:
            for buffer in getattr(chunk, "buffers", []) + getattr(
                chunk, "expert_parallel_buffers", []
            ):
                if not bool(torch.isfinite(buffer.grad_data).all()):
                    ok = False
                    break
    device = next(model[0].parameters()).device
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class SpikeDetector:
    """Flags a loss above ``factor`` × the mean of the previous ``window`` finite losses."""

    def __init__(self, factor: float | None, window: int) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)

    def observe(self, loss: float) -> float | None:
        """The mean the loss is compared with when it is a spike, else None."""
        if self.factor is None or not math.isfinite(loss):
            return None
        mean = None
        if len(self.history) == self.history.maxlen:
            mean = sum(self.history) / len(self.history)
            if not loss > self.factor * mean:
                mean = None
        self.history.append(loss)
        return mean


class BadBatchGuard:
    """Runs one training step with the bad-batch rules of the config (see module docs)."""

    def __init__(self, train_cfg: Any, log: Callable[[str], None]) -> None:
        self.budget = train_cfg.skip_bad_batches
        self.to_skip = set(train_cfg.iterations_to_skip)
        self.spikes = SpikeDetector(train_cfg.spike_factor, train_cfg.spike_window)
        self.log = log
        self.bad = 0

    def run_step(
        self,
        iteration: int,
        streams: list[Any],
        num_microbatches: int,
        step: Callable[[], dict[str, float]],
    ) -> dict[str, float]:
        """Values of step ``iteration``; ``skipped`` is 1 when no update was made on purpose
        (a listed iteration, or a bad batch within the budget)."""
        if iteration in self.to_skip:
            for stream in streams:
                for _ in range(num_microbatches):
                    next(stream)
            self.log(
                f"skipped iteration {iteration} (train.iterations_to_skip): its batch was "
                "read and not trained on"
            )
            return {
                "loss": math.nan,
                "grad_norm": math.nan,
                "lr": math.nan,
                "loss_scale": math.nan,
                "ltm_offset": math.nan,
                "skipped": 1.0,
            }
        values = step()
        if values.get("bad_batch"):
            self.bad += 1
            if self.bad <= self.budget:
                self.log(
                    f"skipped bad batch at step {iteration}: non-finite loss "
                    f"({values['loss']}) or gradients, no update made ({self.bad} of "
                    f"train.skip_bad_batches={self.budget})"
                )
                values["skipped"] = 1.0
            elif self.budget:
                self.log(
                    f"error: bad batch at step {iteration} exceeds "
                    f"train.skip_bad_batches={self.budget}"
                )
            return values
        mean = self.spikes.observe(values["loss"])
        if mean is not None:
            self.log(
                f"warning: loss spike at step {iteration}: loss {values['loss']:.4f} is "
                f"{values['loss'] / mean:.2f}x the mean {mean:.4f} of the previous "
                f"{self.spikes.history.maxlen} steps"
            )
            values["loss_spike"] = 1.0
        return values
