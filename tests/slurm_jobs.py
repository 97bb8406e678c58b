"""The jobs the SLURM launch tests submit: the training programs (a fast fake with the
training program's contract, and the real one on the tiny config), their environment and
sbatch flags, where their logs land, and the torchrun reference they are compared with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from paths import ROOT

from mm_megatron.checkpoint.format import TRACKER

VENV_PY = ROOT / ".venv" / "bin" / "python"
PY = str(VENV_PY) if VENV_PY.exists() else sys.executable
STEP_RE = re.compile(r"^(?:\d+: )?step (\d+)/(\d+) \| loss (\S+)", re.M)


@dataclass(frozen=True)
class Trainer:
    """How one training program is launched in these tests."""

    name: str
    config: str
    overrides: tuple[str, ...]
    iters: int
    cmd: str | None  # MM_TRAIN_CMD; None: the launch scripts' default (pretrain/pretrain_mm.py)
    script: str  # what torchrun runs
    env: tuple[tuple[str, str], ...] = ()
    signal_after: int = 8  # preempt once this step is logged

    def available(self) -> str | None:
        if self.name != "real":
            return None
        need = [
            ROOT / "pretrain" / "pretrain_mm.py",
            ROOT / "data/demo/demo_text_document.bin",
            ROOT / "data/demo/tokenizer/tokenizer.json",
        ]
        missing = [str(p.relative_to(ROOT)) for p in need if not p.exists()]
        if missing:
            return f"{', '.join(missing)} missing (bash scripts/prepare_demo_data.sh)"
        return None


FAKE = Trainer(
    name="fake",
    config="pretrain/configs/tiny_mm.yaml",
    iters=30,
    overrides=("train.iters=30", "checkpoint.interval=10"),
    cmd=f"{PY} tests/fake_trainer.py",
    script="tests/fake_trainer.py",
    env=(("FAKE_TRAINER_STEP_SECONDS", "0.1"),),
    signal_after=8,
)
REAL = Trainer(
    name="real",
    config="pretrain/configs/tiny_mm.yaml",
    iters=10,
    overrides=(
        "train.iters=10",
        "optimizer.warmup_iters=2",
        "checkpoint.interval=5",
        "logging.interval=1",
        "logging.eval_interval=null",
    ),
    cmd=None,
    script="pretrain/pretrain_mm.py",
    signal_after=3,
)
TRAINERS = [pytest.param(FAKE, id="fake"), pytest.param(REAL, id="real")]


def steps(text: str) -> list[tuple[int, str]]:
    """(step, loss) of every training log line, in order."""
    return [(int(m.group(1)), m.group(3)) for m in STEP_RE.finditer(text)]


def job_env(trainer: Trainer, out: Path, **extra: str) -> dict[str, str]:
    env = {
        "MM_GPUS_PER_NODE": "0",
        "MM_CONFIG": trainer.config,
        "MM_OUTPUT_DIR": str(out / "run"),
        "MM_EXTRA_ARGS": " ".join(trainer.overrides),
        "MM_HEALTH_MIN_FREE_GB": "0",
        "MM_SIGNAL_LEAD": "30",  # sbatch_flags' --signal (the job cannot see sbatch's flags)
        "OMP_NUM_THREADS": "1",
        **dict(trainer.env),
        **extra,
    }
    if trainer.cmd:
        env["MM_TRAIN_CMD"] = trainer.cmd
    return env


def sbatch_flags(out: Path) -> list[str]:
    """The test allocation: 2 local nodes, one CPU task each, no GPUs."""
    return [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--time=5",
        "--signal=B:USR1@30",
        f"--output={out}/%x-%j.log",
    ]


def job_log(out: Path, job: str) -> Path:
    """The job's output file (--output=%x-%j.log; the job name is the script's)."""
    return out / f"mm8b-{job}.log"


_reference_cache: dict[str, list[tuple[int, str]]] = {}


def torchrun_reference(trainer: Trainer, tmp: Path) -> list[tuple[int, str]]:
    """The same run launched directly with torchrun (2 processes), computed once per trainer."""
    if trainer.name in _reference_cache:
        return _reference_cache[trainer.name]
    run_dir = tmp / f"torchrun-{trainer.name}"
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        trainer.script,
        "--config",
        trainer.config,
        f"checkpoint.dir={run_dir}/checkpoints",
        f"logging.dir={run_dir}/logs",
        *trainer.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **dict(trainer.env)}
    for key in list(env):
        if key.startswith("SLURM_"):
            env.pop(key)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = steps(proc.stdout)
    assert [s for s, _ in ref] == list(range(1, trainer.iters + 1)), proc.stdout[-3000:]
    _reference_cache[trainer.name] = ref
    return ref


def latest(out: Path) -> str:
    return (out / "run" / "checkpoints" / TRACKER).read_text().strip()
