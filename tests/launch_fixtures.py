"""Stand-in SLURM commands for the launch tests that need no cluster: the ``stub_env``
fixture (stand-in scontrol/srun first in PATH, no SLURM context) and ``run_bash``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from paths import ROOT

# A stand-in for scontrol: answers from STUB_* variables, records requeue calls.
SCONTROL_STUB = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames")
    [ -n "${STUB_HOSTNAMES:-}" ] && printf '%s\n' $STUB_HOSTNAMES
    exit "${STUB_RC:-0}" ;;
  "show node")
    if [ "$3" = "${STUB_FIRST:-}" ]; then
      printf '%s\n' "${STUB_NODE:-}"
    else
      printf '%s\n' "${STUB_NODES:-$STUB_NODE}"
    fi
    exit "${STUB_RC:-0}" ;;
  "show job")
    printf 'JobId=%s Command=%s %s\n' "$3" "${STUB_COMMAND:-}" "${STUB_JOB:-}"
    exit "${STUB_JOB_RC:-0}" ;;
  requeue*) echo "requeue $2" >>"${STUB_CALLS:-/dev/null}" ;;
  *) echo "scontrol stub: $*" >&2; exit 1 ;;
esac
"""
SRUN_STUB = """#!/bin/bash
echo "srun $*" >>"${STUB_CALLS:-/dev/null}"
"""


def run_bash(script: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], env=env, cwd=cwd, text=True, capture_output=True, timeout=60
    )


@pytest.fixture
def stub_env(tmp_path: Path) -> dict[str, str]:
    """An environment with stand-in scontrol/srun first in PATH and no SLURM context."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", SCONTROL_STUB), ("srun", SRUN_STUB)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MM_", "SBATCH_", "MASTER_"))
    }
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["STUB_CALLS"] = str(tmp_path / "calls.txt")
    return env
