"""Hangs on the real local cluster: a job with a frozen rank ends in bounded time and says
which rank hung, instead of holding its allocation silently.

* One rank frozen (SIGSTOP): the other rank's watchdog (runtime.hang_minutes) names it, dumps
  its own Python stacks and exits 1; srun kills the frozen task MM_SRUN_WAIT seconds later.
* One rank dead (SIGKILL) beside a frozen one: no watchdog can run; srun ends the step
  MM_SRUN_WAIT seconds after the first task died, naming both tasks.

Slow (a minute or two each). Run: .venv/bin/python -m pytest -m slurm tests/test_launch_hangs.py
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalCluster
from slurm_jobs import REAL, job_env, job_log, sbatch_flags, steps

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

OVERRIDES = (
    "train.iters=200",
    "optimizer.warmup_iters=2",
    "checkpoint.interval=100",
    "logging.interval=1",
    "logging.eval_interval=null",
    "runtime.hang_minutes=0.5",
    "runtime.step_timeout_minutes=5",
)
SRUN_WAIT = 15


def rank_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the training processes whose command line holds ``marker`` (their
    helper processes, children of a training process, are left out)."""
    found: dict[int, int] = {}
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "pretrain_mm.py" in cmd and marker in cmd:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            rank = next(
                (int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"SLURM_PROCID=")), None
            )
            procs[int(entry.name)] = (ppid, rank)
    for pid, (ppid, rank) in procs.items():
        if ppid not in procs and rank is not None:
            found[rank] = pid
    return found


def start_job(cluster: LocalCluster, out: Path) -> tuple[str, Path]:
    if reason := REAL.available():
        pytest.skip(reason)
    env = job_env(
        REAL,
        out,
        MM_HEALTH_PYTHON="0",
        MM_EXTRA_ARGS=" ".join(OVERRIDES),
        MM_SRUN_WAIT=str(SRUN_WAIT),
        MM_REQUEUE="0",
    )
    job = cluster.sbatch("launch/mm8b.sh", *sbatch_flags(out), env=env)
    log = job_log(out, job)
    deadline = time.monotonic() + 180
    while not (log.exists() and len(steps(log.read_text())) >= 3):
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.3)
    return job, log


def test_frozen_rank_is_named_and_the_job_ends(cluster: LocalCluster, tmp_path: Path) -> None:
    job, log = start_job(cluster, tmp_path)
    pids = rank_pids(str(tmp_path))
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    state = cluster.wait(job, timeout=150, log=log)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert state == "FAILED", text[-4000:]
    assert elapsed < 30 + 2 * 10 + SRUN_WAIT + 40, elapsed  # hang limit + checks + wait
    assert "WATCHDOG: rank 0 on n1" in text, text[-4000:]
    assert "hung: rank 1 on n2" in text and "no heartbeat" in text, text[-4000:]
    assert "most recent call first" in text  # the stacks of rank 0


def test_dead_rank_beside_a_frozen_one_ends_after_srun_wait(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    job, log = start_job(cluster, tmp_path)
    pids = rank_pids(str(tmp_path))
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGSTOP)
    os.kill(pids[0], signal.SIGKILL)
    t0 = time.monotonic()
    state = cluster.wait(job, timeout=120, log=log)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert state == "FAILED", text[-4000:]
    assert elapsed < SRUN_WAIT + 45, elapsed
    assert "task 0: Killed" in text, text[-4000:]
    assert "training failed with status" in text
