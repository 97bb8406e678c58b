"""``logging.profile``: a torch profiler trace of a range of training steps, on rank 0.

The trainer calls :meth:`StepProfiler.step_start` before each step and
:meth:`StepProfiler.step_end` after it. Steps ``start_step`` .. ``end_step`` (1-based, as in
the log) are recorded, each under a ``train_step <n>`` range, with CPU activities and, on a
GPU, CUDA activities. The trace is written when the last one ends, as
``trace_rank0_steps<a>-<b>.json`` (Chrome trace format: Perfetto, chrome://tracing). With
``memory_snapshot`` (CUDA only) the allocator history over the range is dumped as
``memory_rank0_steps<a>-<b>.pickle`` for https://pytorch.org/memory_viz. NVTX ranges
(mm_megatron.profiling) show in ``nsys`` runs. Other ranks do nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config


class StepProfiler:
    """Profile the configured step range on rank 0 (a no-op elsewhere or when off)."""

    def __init__(self, cfg: Config, rank: int) -> None:
        p = cfg.logging.profile
        self.active = p.enabled and rank == 0
        self.first = p.start_step or 0
        self.last = p.last_step if p.enabled else 0
        root = p.dir or str(Path(cfg.logging.dir or ".") / "profile")
        self.dir = Path(root)
        self.memory = p.memory_snapshot and torch.cuda.is_available()
        self.record_shapes = p.record_shapes
        self._prof: Any = None
        self._step_range: Any = None
        if p.memory_snapshot and rank == 0 and not self.memory:
            print("logging.profile.memory_snapshot: skipped, it needs CUDA", flush=True)
        self.written: list[Path] = []

    def step_start(self, step: int) -> None:
        """Before step ``step`` (1-based); its events go under a ``train_step <n>`` range."""
        if self.active and step == self.first and self._prof is None:
            self._start()
        if self._prof is not None:
            self._step_range = torch.profiler.record_function(f"train_step {step}")
            self._step_range.__enter__()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=self.record_shapes)
        self._prof.__enter__()

    def step_end(self, step: int) -> None:
        """After step ``step``; writes the files after the last profiled step."""
        if self._prof is None:
            return
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write what was recorded (also on an early stop)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        tag = f"rank0_steps{self.first}-{self.last}"
        trace = self.dir / f"trace_{tag}.json"
        prof.export_chrome_trace(str(trace))
        self.written.append(trace)
        if self.memory:
            snapshot = self.dir / f"memory_{tag}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
        print("profile written: " + ", ".join(str(p) for p in self.written), flush=True)
