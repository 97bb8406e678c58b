"""Run pretrain/pretrain_mm.py as a user would (one process, or torchrun) on a small real
dataset, and read the per-step losses from its log lines."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

from paths import ROOT

ENTRY = ROOT / "pretrain" / "pretrain_mm.py"
STEP = re.compile(r"^step (\d+)/\d+ \| loss ([0-9.]+) \| lr [0-9.e+-]+ \| grad norm ([0-9.]+)")


@functools.cache
def small_dataset() -> tuple[str, str]:
    """(dataset prefix, tokenizer.json) built from ~40 standard-library modules."""
    from data_fixtures import corpus_jsonl, hf_tokenizer_dir, session_dir

    tok = hf_tokenizer_dir() / "tokenizer.json"
    prefix = session_dir() / "train_small"
    if not Path(f"{prefix}.idx").exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "preprocess_data.py"),
                "--input",
                str(corpus_jsonl()),
                "--output-prefix",
                str(prefix),
                "--tokenizer",
                str(tok),
                "--workers",
                "1",
                "--no-progress",
            ],
            check=True,
            capture_output=True,
        )
    return str(prefix), str(tok)


def base_overrides(tmp: Path, arch: str = "mm") -> list[str]:
    prefix, tok = small_dataset()
    model = [
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_heads=4",
        "model.ffn_hidden_size=128",
        "model.seq_length=64",
        "model.vocab_size=512",
    ]
    if arch == "mm":
        model += [
            "model.short_window=16",
            "model.ltm_offset_min=4",
            "model.ltm_offset_max=12",
            "model.ltm_offset_inference=4",
            "model.scan_chunk_size=16",
        ]
    return model + [
        f"data.train_blend=[{prefix}]",
        "data.valid_blend=null",
        f"data.tokenizer={tok}",
        "data.split=90,10,0",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.iters=4",
        "optimizer.warmup_iters=1",
        "optimizer.lr=3e-3",
        "logging.interval=1",
        "logging.eval_interval=null",
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"logging.dir={tmp / 'logs'}",
        "checkpoint.interval=2",
        "checkpoint.keep_last=null",
    ]


def command(overrides: list[str], arch: str = "mm", nproc: int = 1) -> list[str]:
    config = ROOT / "pretrain" / "configs" / f"tiny_{arch}.yaml"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return launcher + [str(ENTRY), "--config", str(config), *overrides]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(
    overrides: list[str], arch: str = "mm", nproc: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(overrides, arch, nproc),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=ROOT,
    )


def losses(stdout: str) -> dict[int, tuple[float, float]]:
    """{step: (loss, grad norm)} from the log lines."""
    out = {}
    for line in stdout.splitlines():
        match = STEP.match(line.strip())
        if match:
            out[int(match.group(1))] = (float(match.group(2)), float(match.group(3)))
    return out
