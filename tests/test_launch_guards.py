"""Launch code without a cluster, continued: the time limit and signal lead, the requeue
guard's bookkeeping, the per-node health check and the local cluster helper."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import launch_fixtures
import pytest
from launch_fixtures import run_bash
from paths import ROOT

LAUNCH = ROOT / "launch"
stub_env = launch_fixtures.stub_env  # the fixture: stand-in scontrol/srun, no SLURM context


# ----------------------------------------------------------------------------- time limit
@pytest.mark.parametrize(
    "text,seconds",
    [
        ("10", "600"),
        ("05:30", "330"),
        ("01:02:03", "3723"),
        ("2-00", "172800"),
        ("1-02:03:04", "93784"),
        ("08:09", "489"),
        ("UNLIMITED", ""),
        ("junk", ""),
    ],
)
def test_duration_seconds(text: str, seconds: str) -> None:
    proc = run_bash(f"source launch/common.sh; mm_duration_seconds '{text}'", dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == seconds


LEAD = 'source launch/common.sh; SLURM_JOB_ID=5; mm_check_signal_lead; echo "lead=$_mm_signal_lead"'


def test_signal_lead_longer_than_time_limit_refused(stub_env: dict[str, str]) -> None:
    env = {**stub_env, "STUB_JOB": "TimeLimit=00:10:00", "MM_SIGNAL_LEAD": "900"}
    proc = run_bash(LEAD, env)
    assert proc.returncode == 2
    assert (
        "time limit (600 s) is not longer than the time-limit signal's lead (900 s, from "
        "MM_SIGNAL_LEAD)" in proc.stderr
    )


def test_signal_lead_from_script_line_warns(stub_env: dict[str, str]) -> None:
    env = {**stub_env, "STUB_JOB": "TimeLimit=00:10:00", "STUB_COMMAND": str(LAUNCH / "mm8b.sh")}
    proc = run_bash(LEAD + '; mm_on_signal USR1; echo "no requeue: $_mm_no_requeue_reason"', env)
    assert proc.returncode == 0, proc.stderr
    assert "lead=900" in proc.stdout
    assert "WARNING: the time limit (600 s) is not longer" in proc.stderr
    assert "the #SBATCH --signal line of mm8b.sh" in proc.stderr
    assert "no requeue: the time limit (600 s)" in proc.stdout


def test_signal_lead_from_sbatch_signal_and_ok(stub_env: dict[str, str]) -> None:
    env = {**stub_env, "STUB_JOB": "TimeLimit=1-00:00:00", "SBATCH_SIGNAL": "B:USR1@1200"}
    proc = run_bash(LEAD, env)
    assert proc.returncode == 0 and "lead=1200" in proc.stdout
    assert "WARNING" not in proc.stderr


def test_status_names_signal() -> None:
    proc = run_bash(
        "source launch/common.sh; mm_status_text 138; mm_status_text 137; mm_status_text 1",
        dict(os.environ),
    )
    assert proc.stdout.splitlines() == [
        "status 138 (killed by SIGUSR1)",
        "status 137 (killed by SIGKILL)",
        "status 1",
    ]


# ----------------------------------------------------------------------------- requeue guard
GUARD = r"""
set -euo pipefail
source launch/common.sh
MM_STATE_DIR="$T/state"; MM_CKPT_DIR="$T/ckpt"; mkdir -p "$MM_CKPT_DIR"
MM_MAX_FAILURES="${MM_MAX_FAILURES:-3}"; MM_MAX_NO_PROGRESS="${MM_MAX_NO_PROGRESS:-3}"
MM_MAX_STARTS="${MM_MAX_STARTS:-100}"
SLURM_JOB_ID=77
ckpt() { echo "$1" > "$MM_CKPT_DIR/latest_checkpointed_iteration.txt"; }
# One start: $1 = iteration reached (or - for none), $2 = status.
start() {
  mm_state_begin
  [ "$1" = - ] || ckpt "$1"
  mm_state_account "$2" "$(mm_latest_iter)"
  mm_state_save
  if reason="$(mm_guard_reason)"; then
    echo "start $_st_starts: requeue"
  else
    echo "start $_st_starts: stop: $reason"
  fi
}
"""


def guard(tmp_path: Path, body: str, **env: str) -> list[str]:
    proc = run_bash(GUARD + body, {**os.environ, "T": str(tmp_path), **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_guard_failure_cap(tmp_path: Path) -> None:
    out = guard(tmp_path, "start - 1; start - 1; start - 1", MM_MAX_NO_PROGRESS="9")
    assert out[:2] == ["start 1: requeue", "start 2: requeue"]
    assert out[2] == "start 3: stop: 3 consecutive failed starts (cap MM_MAX_FAILURES=3)"


def test_guard_no_progress(tmp_path: Path) -> None:
    out = guard(tmp_path, "start 10 75; start 10 75; start 10 75; start 10 75")
    assert out[:3] == ["start 1: requeue", "start 2: requeue", "start 3: requeue"]
    assert out[3].startswith("start 4: stop: no progress since checkpoint 10 over the last 3")


def test_guard_progress_resets_counters(tmp_path: Path) -> None:
    out = guard(
        tmp_path,
        "start - 1; start - 1; start 5 1; start 5 1; start 9 75; start 12 0",
        MM_MAX_FAILURES="3",
    )
    assert all(line.endswith("requeue") for line in out), out


def test_guard_counts_a_start_that_never_reported(tmp_path: Path) -> None:
    # Two starts killed without a word (node failure): the third start refuses to run.
    body = "mm_state_begin; mm_state_begin; mm_state_begin; echo unreachable"
    proc = run_bash(GUARD + body, {**os.environ, "T": str(tmp_path), "MM_MAX_NO_PROGRESS": "2"})
    assert proc.returncode == 1
    assert "unreachable" not in proc.stdout
    assert "REQUEUE GUARD: not starting again: no progress" in proc.stderr


# ----------------------------------------------------------------------------- health check
NVIDIA_SMI_STUB = """#!/bin/bash
case "$*" in
  -L) for i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done ;;
  *ecc.errors*) printf '0\\n0\\n2\\n0\\n' ;;
  *compute-apps*) echo 4242 ;;
esac
"""


def node_health(env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_bash("source launch/common.sh; mm_node_health", env)


def test_health_ok(stub_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_text("")
    (tmp_path / "d.idx").write_text("")
    env = {
        **stub_env,
        "MM_GPUS_PER_NODE": "0",
        "MM_CKPT_DIR": str(tmp_path / "ck"),
        "MM_LOG_DIR": str(tmp_path / "lg"),
        "MM_DATA_BLEND": f"1.0 {tmp_path}/d",
        "MM_HEALTH_PYTHON": "0",
        "SLURMD_NODENAME": "n7",
    }
    proc = node_health(env)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip() == "HEALTH OK n7"


def test_health_reports_every_problem(stub_env: dict[str, str], tmp_path: Path) -> None:
    smi = Path(stub_env["PATH"].split(":")[0]) / "nvidia-smi"
    smi.write_text(NVIDIA_SMI_STUB)
    smi.chmod(0o755)
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {
        **stub_env,
        "MM_GPUS_PER_NODE": "8",
        "MM_CKPT_DIR": str(blocker / "ck"),
        "MM_LOG_DIR": str(tmp_path / "lg"),
        "MM_DATA_BLEND": "/nonexistent/web",
        "MM_HEALTH_PYTHON": "0",
        "MM_HEALTH_MIN_FREE_GB": "0",
        "SLURMD_NODENAME": "gpu07",
    }
    proc = node_health(env)
    assert proc.returncode == 1
    line = proc.stdout.strip()
    assert line.startswith("HEALTH FAIL gpu07: ")
    for reason in (
        "4 GPUs visible, need 8",
        "1 GPUs with uncorrected ECC errors",
        "1 leftover GPU processes",
        f"cannot write {blocker}/ck",
        "data prefix /nonexistent/web",
    ):
        assert reason in line, (reason, line)


HEALTH_RUN = r"""
source launch/common.sh
MM_HEALTH_CHECK=1 MM_HEALTH_TIMEOUT=20 MM_SRUN_WAIT=5 MM_CONTAINER_IMAGE= MM_SRUN_ARGS=
MM_DRAIN_BAD_NODES=1 MM_STATE_DIR="$T" SLURM_JOB_ID=9 SLURM_JOB_NUM_NODES=$N
rc=0; mm_health_check || rc=$?
echo "rc=$rc"
"""
# srun prints the per-node reports given in STUB_HEALTH ("|"-separated lines).
HEALTH_SRUN = """#!/bin/bash
echo "srun $*" >>"${STUB_CALLS:-/dev/null}"
printf '%s\n' "$STUB_HEALTH" | tr '|' '\n'
"""


def health_check(
    stub_env: dict[str, str], tmp_path: Path, hosts: str, report: str
) -> tuple[str, str]:
    srun = Path(stub_env["PATH"].split(":")[0]) / "srun"
    srun.write_text(HEALTH_SRUN)
    env = {
        **stub_env,
        "STUB_HOSTNAMES": hosts,
        "STUB_HEALTH": report,
        "T": str(tmp_path),
        "N": str(len(hosts.split())),
    }
    proc = run_bash(HEALTH_RUN, env)
    calls = Path(stub_env["STUB_CALLS"])
    return proc.stdout + proc.stderr, calls.read_text() if calls.exists() else ""


def test_health_same_failure_everywhere_is_a_job_error(
    stub_env: dict[str, str], tmp_path: Path
) -> None:
    out, calls = health_check(
        stub_env,
        tmp_path,
        "n1 n2",
        "HEALTH FAIL n1: data prefix /typo (.bin/.idx) not readable|"
        "HEALTH FAIL n2: data prefix /typo (.bin/.idx) not readable",
    )
    assert "rc=2" in out
    assert "job error, not a node fault: data prefix /typo" in out
    assert "drained" not in out and "requeue" not in calls


def test_health_failure_on_some_nodes_is_a_node_fault(
    stub_env: dict[str, str], tmp_path: Path
) -> None:
    out, calls = health_check(
        stub_env, tmp_path, "n1 n2", "HEALTH OK n1|HEALTH FAIL n2: 4 GPUs visible, need 8"
    )
    assert "rc=1" in out and "FAILED (status 0) on: n2" in out
    assert "job error" not in out


def test_health_one_node_job_level_reason_is_a_job_error(
    stub_env: dict[str, str], tmp_path: Path
) -> None:
    out, _ = health_check(stub_env, tmp_path, "n1", "HEALTH FAIL n1: less than 5 GB free in /c")
    assert "rc=2" in out
    out, _ = health_check(
        stub_env, tmp_path, "n1", "HEALTH FAIL n1: 1 GPUs with uncorrected ECC errors"
    )
    assert "rc=1" in out


# ----------------------------------------------------------------------------- local cluster
def test_local_cluster_usage() -> None:
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local_cluster.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "start [NODES]" in proc.stderr and "stop" in proc.stderr


def test_local_cluster_status_when_down(tmp_path: Path) -> None:
    env = {**os.environ, "MM_SLURM_DIR": str(tmp_path / "none")}
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local_cluster.sh"), "status"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "not running" in proc.stderr


def test_local_cluster_example_submits_cpu_mode_one_task_per_node() -> None:
    """The header's example must not pend forever: the MM_ variable (not GPUS_PER_NODE), one
    task per node, and a signal lead shorter than its time limit, given to the job too."""
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local_cluster.sh")], capture_output=True, text=True
    )
    example = proc.stderr[proc.stderr.index("MM_CONFIG=") :]
    example = example[: example.index("launch/mm8b.sh")]
    assert "MM_GPUS_PER_NODE=0" in example and " GPUS_PER_NODE" not in example
    assert "--ntasks-per-node=1" in example
    assert "MM_SIGNAL_LEAD=60" in example and "--signal=B:USR1@60" in example
