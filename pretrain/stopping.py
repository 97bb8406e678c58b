"""Graceful stop: signals, a stop file or a time limit set a flag; ranks agree at a step
boundary; the loop then saves a checkpoint and exits with EXIT_REQUEUE.

The signal handler only records the signal: nothing is saved inside it (saving there can
interrupt a collective or leave a half-written checkpoint). SLURM sends the signal to the
batch shell, which forwards it to the training processes (launch/common.sh); SLURM itself
sends SIGTERM to every process of the job when it is cancelled, requeued, timed out or loses
a node.

:func:`install_stop_handlers` is the first thing the training program does, before its heavy
imports, so that a signal during start-up is recorded instead of killing the process (the
default action of SIGUSR1 and SIGTERM). This module imports torch only when ranks agree.

Helper processes (checkpoint writers) must not die of these signals either: they are sent
to every process of a SLURM job step. :func:`helper_initializer` is their initializer.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_REQUEUE = 75  # stopped early with a checkpoint saved: requeue and resume

# The signals that ask for a graceful stop. SIGINT keeps its default (KeyboardInterrupt).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# What helper processes ignore: the stop signals, and SIGINT/SIGUSR2 that a terminal or a
# site's scripts may send to the whole process group.
HELPER_IGNORED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

_REASONS = {1: "signal", 2: "stop file", 3: "exit duration", 4: "exit interval"}

_received: list[str] = []  # names of the stop signals received by this process, in order


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """Record SIGUSR1/SIGTERM from now on instead of dying of them (idempotent, main thread)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def received_signal() -> str | None:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


def ignore_stop_signals() -> None:
    """Initializer of helper processes: ignore the stop signals sent to the whole step.

    The training process decides when to stop and shuts its helpers down itself; a helper
    killed by the SIGTERM or SIGUSR1 meant for the job would break the save that follows.
    """
    for sig in HELPER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the helper-ignored signals in this thread while starting a helper process.

    A child inherits the blocked mask (through fork and exec), so it cannot die of a signal
    before its initializer has set the signals to be ignored. Signals that arrive meanwhile
    stay pending here and reach the recording handler when the block ends.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_IGNORED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def helper_initializer() -> None:
    """Initializer of long-lived helper processes: ignore the stop signals, and exit when the
    training process is gone (it may die without shutting them down: SIGKILL, os._exit), so
    that no helper outlives it when no SLURM step cleans up after it."""
    import threading

    ignore_stop_signals()
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="mm-parent-watch", daemon=True).start()


class StopController:
    """Collects local stop requests; :meth:`agreed_reason` all-reduces them."""

    def __init__(
        self,
        stop_file: str | None,
        exit_duration_minutes: float | None,
        exit_interval: int | None,
        device: torch.device,
    ) -> None:
        self.stop_file = stop_file
        self.exit_interval = exit_interval
        self.deadline = (
            time.monotonic() + 60 * exit_duration_minutes if exit_duration_minutes else None
        )
        self.device = device
        install_stop_handlers()

    @property
    def signal_received(self) -> str | None:
        """Name of the first stop signal received (also before this object existed)."""
        return received_signal()

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
        import torch
        import torch.distributed as dist

        code = torch.tensor([self._local_code(iteration)], dtype=torch.int32, device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return _REASONS.get(int(code.item()))
