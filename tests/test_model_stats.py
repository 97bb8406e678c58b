"""Parameter and FLOP accounting reproduces the paper and matches built models."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from paths import ROOT

from mm_megatron.config import load_model_config
from mm_megatron.flops import count_params, paper_flops_per_token

CONFIGS = ROOT / "pretrain" / "configs"


def test_large_configs_reproduce_the_paper():
    mm = load_model_config(str(CONFIGS / "mm_8b.yaml"))
    tr = load_model_config(str(CONFIGS / "transformer_8b.yaml"))
    no_ltm = dataclasses.replace(mm, long_term_memory=False)
    # Paper §3.2 and Table 2.
    assert round(count_params(mm).total / 1e9, 3) == 9.926
    assert round(count_params(tr).total / 1e9, 3) == 8.836
    assert round(count_params(no_ltm).total / 1e9, 3) == 8.307
    assert round(paper_flops_per_token(mm, 256) / 1e9, 1) == 18.9
    assert round(paper_flops_per_token(tr, 256) / 1e9, 1) == 16.7
    assert round(paper_flops_per_token(no_ltm, 256) / 1e9, 1) == 15.6


def test_model_stats_cli_prints_the_figures():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "model_stats.py"),
            "--config",
            str(CONFIGS / "mm_8b.yaml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "9.926B" in out and "18.9B" in out and "8.307B" in out and "15.6B" in out
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "model_stats.py"),
            "--config",
            str(CONFIGS / "mm_8b.yaml"),
            "model.ltm_offset_max=300",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "model.ltm_offset_max" in bad.stderr


def _built_param_count(rank, world, cfg):
    from mm_testing import init_parallel

    from mm_megatron.config import ParallelConfig
    from mm_megatron.model import build_model, transformer_config

    init_parallel(ParallelConfig())
    model = build_model(cfg, transformer_config(cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny_mm", "tiny_transformer"])
def test_analytic_count_equals_built_model(name):
    from mp_harness import run_ranks

    cfg = load_model_config(str(CONFIGS / f"{name}.yaml"))
    (built,) = run_ranks(_built_param_count, 1, cfg)
    padding = 2 * (cfg.padded_vocab_size() - cfg.vocab_size) * cfg.hidden_size
    assert built == count_params(cfg).total + padding
