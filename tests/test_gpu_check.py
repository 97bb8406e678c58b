"""benchmarks/gpu_check.sh works before a GPU is lent: its ``--smoke`` mode runs every part
on CPU with tiny shapes and prints the one table; the wrapper is shellcheck-clean and refuses
a full check without CUDA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from paths import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MM_PYTHON": sys.executable}


def test_smoke_prints_one_table(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--json", str(out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    checks = {r["check"]: r for r in rows}
    assert not [r for r in rows if r["status"] in ("ERROR", "FAIL")], rows
    for name in (
        "scan bf16 vs reference (rel err)",
        "STM read bf16 vs dense (rel err)",
        "LTM read bf16 vs dense (rel err)",
        "recompiles after warm-up",
        "2-layer step: MM / transformer tokens/s",
    ):
        assert name in checks, sorted(checks)
    assert any(c.startswith("STM / causal SDPA time") for c in checks)
    assert any("bandwidth" in c for c in checks)
    assert "not available" in checks["Triton scan bf16 vs reference"]["value"] or (
        checks["Triton scan bf16 vs reference"]["status"] == "PASS"
    )
    table = proc.stdout.splitlines()
    assert table[0].startswith("MM v2 GPU check on") and table[1].startswith("check")
    assert len(table) == len(rows) + 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_full_check_without_cuda_says_so():
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--smoke" in proc.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
