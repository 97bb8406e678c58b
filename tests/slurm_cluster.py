"""A real SLURM cluster on this machine for the launch tests (launch/local_cluster.sh).

``slurm_cluster`` is a session fixture: it starts a 2-node cluster once (its own state
directory and free ports, so it never touches another cluster on the machine), yields a
:class:`LocalCluster`, and stops every daemon at the end. Where the cluster cannot start (not
root, slurm-wlm/munge not installed, daemons fail) the tests are skipped with the reason, unless
``MM_REQUIRE_SLURM=1`` (CI on machines that can run them), which turns the skip into a failure.

A test module uses it through its own session fixture (one cluster per session either way)::

    @pytest.fixture(scope="session")
    def cluster() -> Iterator[LocalCluster]:
        yield from local_cluster_session()
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from paths import ROOT

SCRIPT = ROOT / "launch" / "local_cluster.sh"
NODES = 2
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _unavailable() -> str | None:
    """Why a local cluster cannot run here, or None."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (the SLURM daemons run as SlurmUser=root)"
    missing = [
        b
        for b in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")
        if shutil.which(b) is None
    ]
    if missing:
        return f"{', '.join(missing)} not installed; run: apt-get install -y slurm-wlm munge"
    return None


def _free_port_base(count: int) -> int:
    """A base port such that base..base+count are free now."""
    for base in range(17100, 30000, 50):
        ok = True
        for port in range(base, base + count + 1):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range for the local cluster")


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("MM_REQUIRE_SLURM") == "1":
        pytest.fail(f"local SLURM cluster required (MM_REQUIRE_SLURM=1) but: {reason}")
    pytest.skip(f"local SLURM cluster unavailable: {reason}")


@dataclass
class LocalCluster:
    """A running local cluster and helpers to submit and watch jobs."""

    state_dir: Path
    env: dict[str, str]
    nodes: int = NODES
    jobs: list[str] = field(default_factory=list)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd),
            env={**self.env, **(env or {})},
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=check,
            timeout=timeout,
        )

    def sbatch(
        self,
        script: str,
        *flags: str,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> str:
        """Submit ``script`` (relative to the repository) and return the job id."""
        out = self.run("sbatch", "--parsable", *flags, script, *args, env=env).stdout.strip()
        job = out.split(";")[0]
        assert job.isdigit(), f"sbatch printed {out!r}"
        self.jobs.append(job)
        return job

    def job_info(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def state(self, job: str) -> str:
        return self.job_info(job).get("JobState", "UNKNOWN")

    def wait(self, job: str, timeout: float = 90, log: Path | None = None) -> str:
        """Wait until ``job`` reaches a final state and return it; on timeout cancel it."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in TERMINAL:
                return state
            time.sleep(0.5)
        self.run("scancel", job, check=False)
        text = log.read_text() if log and log.exists() else "(no log)"
        pytest.fail(f"job {job} still {state} after {timeout:.0f}s; log:\n{text[-4000:]}")

    def signal_batch(self, job: str, sig: str) -> None:
        """Send ``sig`` to the batch shell only, as --signal=B:SIG@lead does."""
        self.run("scancel", "--batch", f"--signal={sig}", job)

    def cancel_all(self) -> None:
        for job in self.jobs:
            self.run("scancel", job, check=False)


def start_cluster(state_dir: Path) -> LocalCluster:
    """Start a NODES-node cluster under ``state_dir`` (raises on failure)."""
    env = {
        **os.environ,
        "MM_SLURM_DIR": str(state_dir),
        "MM_SLURM_PORT": str(_free_port_base(NODES + 1)),
    }
    env.pop("SLURM_CONF", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start", str(NODES)],
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"launch/local_cluster.sh start failed:\n{proc.stderr[-3000:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    if not conf:
        raise RuntimeError(f"local_cluster.sh printed no SLURM_CONF:\n{proc.stdout}")
    env["SLURM_CONF"] = conf.group(1)
    # Job environment: nothing from the test process's own SLURM context, if any.
    for key in list(env):
        if key.startswith(("SLURM_JOB", "SLURM_PROCID", "SLURM_NTASKS", "SBATCH_")):
            env.pop(key)
    return LocalCluster(state_dir=state_dir, env=env)


def stop_cluster(cluster: LocalCluster) -> None:
    env = {**cluster.env, "MM_SLURM_DIR": str(cluster.state_dir)}
    subprocess.run(
        ["bash", str(SCRIPT), "stop"], env=env, text=True, capture_output=True, timeout=120
    )


def local_cluster_session() -> Iterator[LocalCluster]:
    """Body of a session fixture: a 2-node local SLURM cluster, or a skip with the reason."""
    reason = _unavailable()
    if reason:
        _skip_or_fail(reason)
    state_dir = Path(tempfile.mkdtemp(prefix="mm-slurm-test-"))
    try:
        cluster = start_cluster(state_dir)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as err:
        subprocess.run(
            ["bash", str(SCRIPT), "stop"],
            env={**os.environ, "MM_SLURM_DIR": str(state_dir)},
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(state_dir, ignore_errors=True)
        _skip_or_fail(f"the cluster did not start: {err}")
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        stop_cluster(cluster)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalCluster]:
    """A 2-node local SLURM cluster for the session, or a skip with the reason."""
    yield from local_cluster_session()
