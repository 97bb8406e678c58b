"""Every way a job can be asked to stop, on the real local cluster, with the real trainer.

A stop saves a checkpoint at the step where it happens and exits 75, whenever it comes: during
start-up (nothing new to save), or after periodic checkpoints, when the checkpoint writer's
helper processes exist and receive the same signals as the training ranks (SLURM signals every
process of the step). Each job goes through several stop paths, one per start:

* SIGUSR1 to the batch shell while the training step starts: status 75 without a save (the
  tasks, not yet able to handle it, get the stop file instead of the signal), requeue;
* SIGUSR1 to the batch shell (the time-limit warning, ``scancel --batch --signal=USR1``);
* ``scontrol requeue`` (SIGTERM to every process; SLURM requeues);
* plain ``scancel`` (SIGTERM to every process; the job ends CANCELLED);
* the time-limit warning of a short ``--time`` (slow);

and then the log must show every step exactly once (nothing retrained after a requeue), a
checkpoint published at each stop step and resumed from, and no unpublished ``.tmp`` left.

Run: .venv/bin/python -m pytest -m slurm tests/test_launch_stops.py
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from slurm_cluster import LocalCluster
from slurm_jobs import REAL, job_env, job_log, latest, sbatch_flags, steps

pytestmark = pytest.mark.slurm

START_RE = re.compile(r"\] start (\d+) of job")
STOP_RE = re.compile(r"stop requested \(([^)]*)\) at step (\d+): saving and exiting with status 75")
SAVE_RE = re.compile(r"^(?:saved|scheduled asynchronous save of) checkpoint", re.M)
OVERRIDES = (
    "train.iters=40",
    "optimizer.warmup_iters=2",
    "checkpoint.interval=2",
    "checkpoint.keep_last=3",
    "logging.interval=1",
    "logging.eval_interval=null",
)


def segments(text: str) -> list[str]:
    """The log of each start of the job, in order."""
    marks = [m.start() for m in START_RE.finditer(text)]
    ends = [*marks[1:], len(text)] if marks else []
    return [text[a:b] for a, b in zip(marks, ends, strict=True)]


def after_two_saves(segment: str) -> bool:
    """At least two periodic saves in this start, and a step trained after the second."""
    saves = list(SAVE_RE.finditer(segment))
    return len(saves) >= 2 and bool(steps(segment[saves[1].end() :]))


def launching(segment: str) -> bool:
    """The training step is being launched."""
    return "launching:" in segment


def drive(
    cluster: LocalCluster,
    job: str,
    log: Path,
    plan: list[tuple[Callable[[str], bool], Callable[[], None]]],
    timeout: float = 400,
) -> str:
    """For start k of the job, wait for plan[k]'s condition on its log, then run its action;
    then wait for the job's final state and return it."""
    deadline = time.monotonic() + timeout
    for k, (ready, act) in enumerate(plan):
        while True:
            text = log.read_text() if log.exists() else ""
            segs = segments(text)
            if len(segs) > k + 1:
                pytest.fail(
                    f"start {k + 2} began before the action of start {k + 1}:\n{text[-4000:]}"
                )
            if len(segs) == k + 1 and ready(segs[k]):
                act()
                break
            state = cluster.state(job)
            assert state not in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, text[-4000:]
            assert time.monotonic() < deadline, f"start {k + 1} never got ready:\n{text[-4000:]}"
            time.sleep(0.2)
        # Wait until this start has ended (the next one began, or the job is over).
        while True:
            text = log.read_text()
            if len(segments(text)) > k + 1 or cluster.state(job) in {
                "COMPLETED",
                "FAILED",
                "CANCELLED",
            }:
                break
            assert time.monotonic() < deadline, f"start {k + 1} did not end:\n{text[-4000:]}"
            time.sleep(0.2)
    return cluster.wait(job, timeout=max(30.0, deadline - time.monotonic()), log=log)


def check_stops(out: Path, text: str, stopped_starts: list[int]) -> list[int]:
    """The common assertions: each stopped start saved at its stop step, exited 75, and the
    next start resumed from exactly there; every step logged once; no .tmp left."""
    segs = segments(text)
    stops = []
    for k in stopped_starts:
        seg = segs[k]
        m = STOP_RE.search(seg)
        assert m, f"start {k + 1} did not stop with a save:\n{seg[-4000:]}"
        stop = int(m.group(2))
        stops.append(stop)
        assert "training stopped gracefully" in seg, seg[-4000:]
        assert "Traceback" not in seg, seg[-4000:]
        ckpt = out / "run" / "checkpoints" / f"iter_{stop:07d}"
        if k + 1 < len(segs):
            assert f"resuming from {ckpt}" in segs[k + 1], segs[k + 1][-4000:]
        else:
            assert latest(out) == str(stop)
            assert (ckpt / "mm_checkpoint.json").is_file()
    got = [s for s, _ in steps(text)]
    assert got == list(range(1, len(got) + 1)), f"repeated or lost steps: {got}\n{text[-3000:]}"
    left = sorted(p.name for p in (out / "run" / "checkpoints").glob("*.tmp"))
    assert not left, f"unpublished checkpoints left: {left}"
    return stops


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("sync", id="sync"),
        pytest.param("async", id="async", marks=pytest.mark.slow),
    ],
)
def test_every_stop_path_saves_after_periodic_checkpoints(
    cluster: LocalCluster, tmp_path: Path, mode: str
) -> None:
    """Start-up USR1, then USR1 to the batch shell, scontrol requeue and scancel, each after
    two periodic saves of its start: status 75 and a checkpoint at the stop step every time."""
    if reason := REAL.available():
        pytest.skip(reason)
    out = tmp_path
    extra = " checkpoint.async_save=true" if mode == "async" else ""
    env = job_env(
        REAL,
        out,
        MM_HEALTH_PYTHON="0",
        MM_EXTRA_ARGS=" ".join(OVERRIDES) + extra,
        MM_MAX_NO_PROGRESS="3",
    )
    job = cluster.sbatch("launch/mm8b.sh", *sbatch_flags(out), env=env)
    log = job_log(out, job)
    plan = [
        (launching, lambda: cluster.signal_batch(job, "USR1")),
        (after_two_saves, lambda: cluster.signal_batch(job, "USR1")),
        (after_two_saves, lambda: cluster.run("scontrol", "requeue", job)),
        (after_two_saves, lambda: cluster.run("scancel", job)),
    ]
    state = drive(cluster, job, log, plan)
    text = log.read_text()
    assert state == "CANCELLED", text[-4000:]
    segs = segments(text)
    assert len(segs) == 4, text[-4000:]
    # Start-up: not fatal (no status 138), nothing saved, requeued.
    assert (
        "before the first step of this start (step 0): exiting with status 75 without "
        "saving" in segs[0]
    ), segs[0][-4000:]
    assert "requeued job" in segs[0] and not (out / "run" / "checkpoints" / "iter_0000000").exists()
    stops = check_stops(out, text, [1, 2, 3])
    assert stops == sorted(stops) and stops[0] >= 5, stops
    assert "received SIGTERM" in segs[2] and "received SIGTERM" in segs[3]
    assert cluster.job_info(job).get("Restarts") == "3"


@pytest.mark.slow
def test_time_limit_warning_saves_and_requeues(cluster: LocalCluster, tmp_path: Path) -> None:
    """--time=2 with a 60 s lead: SLURM's warning (30-60 s into the start) stops the run with
    a save after its periodic checkpoints; the requeued start resumes from it."""
    if reason := REAL.available():
        pytest.skip(reason)
    out = tmp_path
    env = job_env(
        REAL,
        out,
        MM_HEALTH_PYTHON="0",
        MM_SIGNAL_LEAD="60",
        MM_EXTRA_ARGS=" ".join(OVERRIDES).replace("iters=40", "iters=400"),
    )
    flags = [f for f in sbatch_flags(out) if not f.startswith(("--time", "--signal"))]
    job = cluster.sbatch("launch/mm8b.sh", *flags, "--time=2", "--signal=B:USR1@60", env=env)
    log = job_log(out, job)

    def resumed(segment: str) -> bool:
        return bool(steps(segment))

    plan = [
        (lambda seg: "received SIGUSR1" in seg, lambda: None),
        (resumed, lambda: cluster.run("scancel", job)),
    ]
    state = drive(cluster, job, log, plan, timeout=300)
    text = log.read_text()
    assert state == "CANCELLED", text[-4000:]
    segs = segments(text)
    assert len(SAVE_RE.findall(segs[0])) >= 2, "the warning came before two periodic saves"
    check_stops(out, text, [0, 1])


@pytest.mark.slow
def test_lead_longer_than_time_limit_does_not_loop(cluster: LocalCluster, tmp_path: Path) -> None:
    """--time=1 against the script's @900 lead: SLURM signals at once. With MM_SIGNAL_LEAD the
    job refuses to start; without it, it warns and the first SIGUSR1 ends it (no requeue
    loop: the README's old example failed three starts in 81 s)."""
    from slurm_jobs import FAKE

    flags = [f for f in sbatch_flags(tmp_path) if not f.startswith(("--time", "--signal"))]
    refused_env = job_env(FAKE, tmp_path / "a", MM_HEALTH_PYTHON="0", MM_SIGNAL_LEAD="900")
    refused = cluster.sbatch("launch/mm8b.sh", *flags, "--time=1", env=refused_env)
    warned_env = job_env(FAKE, tmp_path / "b", MM_HEALTH_PYTHON="0", FAKE_TRAINER_STEP_SECONDS="3")
    warned_env.pop("MM_SIGNAL_LEAD")
    warned = cluster.sbatch("launch/mm8b.sh", *flags, "--time=1", env=warned_env)
    assert cluster.wait(refused, timeout=60, log=job_log(tmp_path, refused)) == "FAILED"
    text = job_log(tmp_path, refused).read_text()
    assert (
        "time limit (60 s) is not longer than the time-limit signal's lead (900 s, from "
        "MM_SIGNAL_LEAD)"
        in text
        and "launching:" not in text
    ), text[-3000:]
    state = cluster.wait(warned, timeout=120, log=job_log(tmp_path, warned))
    text = job_log(tmp_path, warned).read_text()
    assert state in {"FAILED", "TIMEOUT"}, text[-3000:]
    assert "WARNING: the time limit (60 s) is not longer" in text, text[-3000:]
    assert "not requeueing: the time limit (60 s)" in text and "requeued job" not in text
