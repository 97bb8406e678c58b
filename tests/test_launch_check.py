"""launch/check.sh (validation before submitting) and the optional launch features (per-node
logs, mail when a guard stops a job), with stand-in SLURM commands: no cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

import launch_fixtures
import pytest
from launch_fixtures import run_bash
from paths import ROOT

stub_env = launch_fixtures.stub_env  # the fixture: stand-in scontrol/srun, no SLURM context


# ----------------------------------------------------------------------------- check.sh
def check_job(
    stub_env: dict[str, str], tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess:
    if not (ROOT / "data/demo/demo_text_document.bin").exists():
        pytest.skip("demo data not prepared (bash scripts/prepare_demo_data.sh)")
    full = {
        **stub_env,
        "MM_GPUS_PER_NODE": "0",
        "MM_CONFIG": "pretrain/configs/tiny_mm.yaml",
        "MM_OUTPUT_DIR": str(tmp_path / "run"),
        "MM_REPO": str(ROOT),
        **env,
    }
    return subprocess.run(
        ["bash", "launch/check.sh", "launch/mm8b.sh", *args],
        cwd=ROOT,
        env=full,
        text=True,
        capture_output=True,
        timeout=120,
    )


def test_check_job_plan_ok(stub_env: dict[str, str], tmp_path: Path) -> None:
    proc = check_job(
        stub_env,
        tmp_path,
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=10",
        "train.iters=20",
        MM_SIGNAL_LEAD="60",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "plan: world 2 = 2 nodes x 1 tasks: tp 1 pp 1 dp 2" in proc.stdout
    assert "plan: time limit 600 s, signal lead 60 s" in proc.stdout
    assert "CHECK OK" in proc.stdout
    assert not (tmp_path / "run").exists(), "the check must not create the run's directories"


def test_check_job_reports_every_problem(stub_env: dict[str, str], tmp_path: Path) -> None:
    proc = check_job(
        stub_env,
        tmp_path,
        "--nodes=3",
        "--ntasks-per-node=1",
        "--time=10",
        MM_DATA_BLEND="/nonexistent/web_text_document",
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    for problem in (
        "problem: layout: train.global_batch_size: 8 is not divisible",
        "problem: data: data.train_blend",
        "/nonexistent/web_text_document",
        "problem: time limit: 600 s is not longer than the signal lead 900 s",
    ):
        assert problem in proc.stdout, (problem, proc.stdout)
    assert "CHECK FAILED: 3 problems" in proc.stdout
    bad_key = check_job(stub_env, tmp_path, "train.no_such_key=1")
    assert bad_key.returncode == 2 and "no_such_key" in bad_key.stdout


def test_node_logs_and_guard_mail(stub_env: dict[str, str], tmp_path: Path) -> None:
    env = {
        **stub_env,
        "MM_REPO": str(ROOT),
        "MM_DRY_RUN": "1",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NUM_NODES": "2",
        "MM_MASTER_ADDR": "10.0.0.1",
        "MM_NODE_LOGS": "1",
        "MM_OUTPUT_DIR": str(tmp_path / "run"),
    }
    proc = run_bash("bash launch/mm8b.sh", env)
    assert proc.returncode == 0, proc.stderr
    assert f"--output={tmp_path}/run/logs/nodes/%j-%N.log" in proc.stdout
    mail = Path(stub_env["PATH"].split(":")[0]) / "mail"
    mail.write_text('#!/bin/bash\necho "mail $*" >>"$STUB_CALLS"; cat >>"$STUB_CALLS"\n')
    mail.chmod(0o755)
    proc = run_bash(
        "source launch/common.sh; MM_RUN_NAME=r MM_STATE_DIR=/s SLURM_JOB_ID=42 "
        "MM_GUARD_MAIL=ops@example.org mm_guard_mail '3 consecutive failed starts'",
        stub_env,
    )
    assert proc.returncode == 0, proc.stderr
    calls = Path(stub_env["STUB_CALLS"]).read_text()
    assert "mail -s [r] job 42 stopped by the requeue guard ops@example.org" in calls
    assert "3 consecutive failed starts" in calls
