"""The launch scripts on a real SLURM cluster (2 nodes on this machine, CPU, gloo).

* ``sbatch launch/mm8b.sh`` with environment overrides trains to completion on 2 nodes, and its
  per-step losses equal those of the same run under torchrun.
* Preemption: SIGUSR1 to the batch shell mid-run checkpoints, requeues, resumes and finishes
  with every step logged exactly once and the losses of an uninterrupted run.
* A program that fails at start is requeued until the failure cap, then the job stops with a
  clear log line.
* A failing per-node health check names the bad nodes and keeps training from starting.
* ``sbatch launch/preprocess.sh`` on 2 nodes writes the same bytes as a one-node run.

The "fake" variants run tests/fake_trainer.py (the training program's contract, fast); the
"real" variants run pretrain/pretrain_mm.py on the tiny config and the demo data (skipped when
the demo data is not prepared: bash scripts/prepare_demo_data.sh).

Needs root, slurm-wlm and munge (tests/cluster.py skips otherwise; MM_REQUIRE_SLURM=1
makes that a failure). Run: .venv/bin/python -m pytest -m slurm tests/test_launch_slurm.py
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from paths import ROOT
from slurm_cluster import LocalCluster
from slurm_jobs import (
    FAKE,
    PY,
    TRAINERS,
    Trainer,
    job_env,
    job_log,
    latest,
    sbatch_flags,
    steps,
    torchrun_reference,
)

pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("trainer", TRAINERS)
def test_sbatch_two_nodes_matches_torchrun(
    cluster: LocalCluster, trainer: Trainer, tmp_path: Path
) -> None:
    if reason := trainer.available():
        pytest.skip(reason)
    out = tmp_path
    job = cluster.sbatch("launch/mm8b.sh", *sbatch_flags(out), env=job_env(trainer, out))
    state = cluster.wait(job, timeout=110, log=out / f"mm8b-{job}.log")
    text = job_log(out, job).read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "HEALTH OK n1" in text and "HEALTH OK n2" in text, text[-4000:]
    # Rendezvous on the first node's NodeAddr as SLURM reports it.
    node = cluster.run("scontrol", "show", "node", "n1", "-o").stdout
    addr = re.search(r"NodeAddr=(\S+)", node).group(1)
    assert re.search(rf"rendezvous {re.escape(addr)}:\d+", text), text[-4000:]
    assert "training finished" in text
    assert latest(out) == str(trainer.iters)
    got = steps(text)
    assert [s for s, _ in got] == list(range(1, trainer.iters + 1)), text[-4000:]
    assert got == torchrun_reference(trainer, tmp_path)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_preemption_requeues_and_resumes_exactly(
    cluster: LocalCluster, trainer: Trainer, tmp_path: Path
) -> None:
    if reason := trainer.available():
        pytest.skip(reason)
    out = tmp_path
    env = job_env(trainer, out, MM_HEALTH_PYTHON="0")
    if trainer.name == "fake":
        env["FAKE_TRAINER_STEP_SECONDS"] = "0.2"
    job = cluster.sbatch("launch/mm8b.sh", *sbatch_flags(out), env=env)
    deadline = time.monotonic() + 90
    while True:
        log = job_log(out, job)
        seen = steps(log.read_text()) if log.exists() else []
        if seen and seen[-1][0] >= trainer.signal_after:
            break
        assert time.monotonic() < deadline, f"no step {trainer.signal_after} in 90 s"
        assert cluster.state(job) in {"PENDING", "RUNNING", "CONFIGURING"}, (
            log.read_text()[-3000:] if log.exists() else "no log"
        )
        time.sleep(0.2)
    cluster.signal_batch(job, "USR1")
    state = cluster.wait(job, timeout=110, log=log)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "received SIGUSR1" in text
    assert "requeued job" in text
    assert "start 2 of job" in text and "start 3 of job" not in text, text[-4000:]
    assert cluster.job_info(job).get("Restarts") == "1"
    got = steps(text)
    # Every step exactly once, in order, and the losses of an uninterrupted run.
    assert [s for s, _ in got] == list(range(1, trainer.iters + 1)), text[-4000:]
    stop_at = text.index("received SIGUSR1")
    assert steps(text[:stop_at]), "the signal came before training"
    assert len(steps(text[:stop_at])) < trainer.iters, "the signal came after training"
    assert got == torchrun_reference(trainer, tmp_path)
    assert latest(out) == str(trainer.iters)
    state_file = out / "run" / "logs" / "launch" / f"job-{job}.state"
    assert "starts=2" in state_file.read_text()


def test_failing_start_stops_after_the_cap(cluster: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path
    env = job_env(
        FAKE,
        out,
        FAKE_TRAINER_FAIL_AT_START="1",
        MM_MAX_FAILURES="2",
        MM_MAX_NO_PROGRESS="5",
        MM_HEALTH_PYTHON="0",
    )
    job = cluster.sbatch("launch/mm8b.sh", *sbatch_flags(out), env=env)
    state = cluster.wait(job, timeout=90, log=out / f"mm8b-{job}.log")
    text = job_log(out, job).read_text()
    assert state == "FAILED", text[-4000:]
    assert len(re.findall(r"\] start \d+ of job", text)) == 2, text[-4000:]
    assert text.count("requeued job") == 1
    assert (
        "REQUEUE GUARD: not requeueing: 2 consecutive failed starts (cap MM_MAX_FAILURES=2)"
    ) in text, text[-4000:]
    assert cluster.job_info(job).get("Restarts") == "1"


def test_preprocess_two_nodes_matches_one_node(cluster: LocalCluster, tmp_path: Path) -> None:
    corpus = ROOT / "data" / "demo" / "stdlib_valid.jsonl"
    tokenizer = ROOT / "data" / "demo" / "tokenizer" / "tokenizer.json"
    if not corpus.exists() or not tokenizer.exists():
        pytest.skip("demo corpus not prepared (bash scripts/prepare_demo_data.sh)")
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = corpus.read_text().splitlines(keepends=True)[:40]
    for i in range(4):  # several files, so that both nodes get a share
        (raw / f"part{i}.jsonl").write_text("".join(lines[i::4]))
    env = {
        "MM_PREP_INPUT": str(raw),
        "MM_PREP_OUTPUT_PREFIX": str(tmp_path / "out" / "multi"),
        "MM_TOKENIZER": str(tokenizer),
        "MM_PREP_ARGS": "--no-progress",
    }
    job = cluster.sbatch(
        "launch/preprocess.sh", "--nodes=2", f"--output={tmp_path}/%x-%j.log", env=env
    )
    log = tmp_path / f"mm-preprocess-{job}.log"
    state = cluster.wait(job, timeout=90, log=log)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "(rank 0 of 2)" in text and "(rank 1 of 2)" in text, text[-4000:]
    assert "merged from 2 parts" in text
    single = tmp_path / "out" / "single"
    proc = subprocess.run(
        [
            PY,
            "tools/preprocess_data.py",
            "--input",
            str(raw),
            "--output-prefix",
            str(single),
            "--tokenizer",
            str(tokenizer),
            "--workers",
            "1",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for ext in (".bin", ".idx"):
        multi = (tmp_path / "out" / f"multi{ext}").read_bytes()
        assert multi == Path(f"{single}{ext}").read_bytes(), ext


def test_failed_health_check_names_the_nodes(cluster: LocalCluster, tmp_path: Path) -> None:
    """The same failure on every node (a typo in the data prefix) is the job's, not the
    nodes': final at the first start, no requeue, no node drained (MM_DRAIN_BAD_NODES=1)."""
    out = tmp_path
    env = job_env(
        FAKE,
        out,
        MM_DATA_BLEND="1.0 /nonexistent/web_text_document",
        MM_HEALTH_PYTHON="0",
        MM_DRAIN_BAD_NODES="1",
    )
    job = cluster.sbatch("launch/mm8b.sh", *sbatch_flags(out), env=env)
    state = cluster.wait(job, timeout=60, log=job_log(out, job))
    text = job_log(out, job).read_text()
    assert state == "FAILED", text[-4000:]
    assert "HEALTH FAIL n1: data prefix /nonexistent/web_text_document" in text, text[-4000:]
    assert "HEALTH FAIL n2: data prefix /nonexistent/web_text_document" in text
    assert "health check FAILED (status 1) on: n1 n2" in text
    assert "launching:" not in text, "training must not start after a failed health check"
    assert "not requeueing: the health check failed the same way on every node" in text
    assert "requeued job" not in text and "drained node" not in text, text[-4000:]
    assert cluster.job_info(job).get("Restarts") == "0"
    nodes = cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
    assert not [n for n in nodes if "drain" in n or "drng" in n], nodes


def test_local_nodes_share_the_cores(cluster: LocalCluster) -> None:
    """Each local node declares its share of the machine's cores, not all of them (which
    doubled the threads per task on a 2-node cluster)."""
    info = cluster.run("scontrol", "show", "node", "n1", "-o").stdout
    cpus = int(re.search(r"CPUTot=(\d+)", info).group(1))
    assert cpus == max(1, (os.cpu_count() or 1) // cluster.nodes), info
