"""Hang detection: a per-rank watchdog thread and per-rank heartbeat files.

A rank that makes no step progress for ``runtime.hang_minutes`` (a peer frozen by SIGSTOP, a
dead network link, a deadlock) would otherwise sit in a collective until the process-group
timeout, printing nothing. The watchdog thread of every live rank notices it, names the ranks
that look responsible, dumps its own Python stacks (faulthandler, every thread) and exits
with status 1, so that srun ends the step (after ``--wait``) and the job requeues.

Which rank hung: every rank's watchdog thread rewrites ``<dir>/rank_NNNNN.json`` (rank, node,
pid, last step) every few seconds. A frozen process stops rewriting it (its file goes stale);
a rank stuck in its own computation keeps a lower step than the others. Saves and validation
pause the watchdog (their collectives are bounded by the process-group timeout instead).
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

EXIT_HUNG = 1  # a failure: the job requeues and resumes from the latest checkpoint


def node_name() -> str:
    """The SLURM node name of this process (the host name outside SLURM)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class Watchdog:
    """Start with :meth:`start` after the first step; call :meth:`beat` at every step."""

    def __init__(
        self, timeout_s: float, rank: int, heartbeat_dir: str | None, world_size: int = 1
    ) -> None:
        self.timeout_s = timeout_s
        self.rank = rank
        self.world_size = world_size
        self.node = node_name()
        self.dir = Path(heartbeat_dir) if heartbeat_dir else None
        self.interval_s = max(0.5, min(10.0, timeout_s / 4))
        self.step = 0
        self.last = time.monotonic()
        self.paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called by the training loop
    def beat(self, step: int) -> None:
        """Step ``step`` is done."""
        self.step = step
        self.last = time.monotonic()

    def pause(self) -> None:
        """Stop counting (a save or a validation follows)."""
        self.paused = True

    def resume(self) -> None:
        """Count again from now."""
        self.last = time.monotonic()
        self.paused = False

    def start(self) -> None:
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._write_heartbeat()
        self._thread = threading.Thread(target=self._run, name="mm-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- the thread
    def _heartbeat_path(self, rank: int) -> Path:
        assert self.dir is not None
        return self.dir / f"rank_{rank:05d}.json"

    def _write_heartbeat(self) -> None:
        if self.dir is None:
            return
        record = {
            "rank": self.rank,
            "node": self.node,
            "pid": os.getpid(),
            "step": self.step,
            "time": time.time(),
        }
        tmp = self._heartbeat_path(self.rank).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._heartbeat_path(self.rank))
        except OSError:
            pass  # a full or flaky file system must not kill training

    def suspects(self) -> list[str]:
        """Descriptions of the ranks that look hung, from the heartbeat files."""
        if self.dir is None:
            return []
        now, records = time.time(), []
        for path in sorted(self.dir.glob("rank_*.json")):
            try:
                records.append(json.loads(path.read_text()) | {"mtime": path.stat().st_mtime})
            except (OSError, ValueError):
                continue
        stale_after = 2 * self.interval_s + 5
        out = [
            f"rank {r['rank']} on {r['node']} (pid {r['pid']}, step {r['step']}): no "
            f"heartbeat for {now - r['mtime']:.0f} s (stopped, frozen or dead)"
            for r in records
            if now - r["mtime"] > stale_after
        ]
        seen = {r["rank"] for r in records}
        out += [
            f"rank {rank}: no heartbeat at all (frozen or dead since its first step)"
            for rank in range(self.world_size)
            if rank not in seen
        ]
        if not out and records:
            low = min(r["step"] for r in records)
            if any(r["step"] > low for r in records):
                out = [
                    f"rank {r['rank']} on {r['node']} (pid {r['pid']}): still at step "
                    f"{r['step']} while others finished step {low + 1}"
                    for r in records
                    if r["step"] == low
                ]
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write_heartbeat()
            idle = time.monotonic() - self.last
            if not self.paused and idle > self.timeout_s:
                self._trip(idle)

    def _trip(self, idle: float) -> None:
        suspects = self.suspects()
        blame = "; ".join(suspects) if suspects else "no heartbeat points at another rank"
        print(
            f"WATCHDOG: rank {self.rank} on {self.node} (pid {os.getpid()}): no step "
            f"progress for {idle:.0f} s after step {self.step} (runtime.hang_minutes = "
            f"{self.timeout_s / 60:g}); hung: {blame}. Python stacks of this rank follow; "
            "exiting with status 1 so that the job requeues.",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)
