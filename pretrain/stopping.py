"""Graceful stop: signals, a stop file or a time limit set a flag; ranks agree at a step
boundary; the loop then saves a checkpoint and exits with EXIT_REQUEUE.

The signal handler only records the signal: nothing is saved inside it (saving there can
interrupt a collective or leave a half-written checkpoint). SLURM sends the signal to the
batch shell, which forwards it to the training processes (launch/common.sh).
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_REQUEUE = 75  # stopped early with a checkpoint saved: requeue and resume

_REASONS = {1: "signal", 2: "stop file", 3: "exit duration", 4: "exit interval"}


class StopController:
    """Collects local stop requests; :meth:`agreed_reason` all-reduces them."""

    def __init__(self, stop_file: str | None, exit_duration_minutes: float | None,
                 exit_interval: int | None, device: torch.device) -> None:  # fmt: skip
        self.stop_file = stop_file
        self.exit_interval = exit_interval
        self.deadline = (
            time.monotonic() + 60 * exit_duration_minutes if exit_duration_minutes else None
        )
        self.device = device
        self.signal_received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_received = signum

    def _local_code(self, iteration: int) -> int:
        if self.signal_received is not None:
            return 1
        if self.stop_file and os.path.exists(self.stop_file):
            return 2
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return 3
        if self.exit_interval and iteration > 0 and iteration % self.exit_interval == 0:
            return 4
        return 0

    def agreed_reason(self, iteration: int) -> str | None:
        """The stop reason if any rank has one (collective: call on every rank)."""
        code = torch.tensor([self._local_code(iteration)], dtype=torch.int32, device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return _REASONS.get(int(code.item()))
