"""The performance options through the training CLI (one process, CPU).

* ``train.recompute=selective`` follows the run without recompute: losses and gradient norms
  read from TensorBoard (float32) agree to rel 1e-6 over 4 steps;
* ``logging.profile`` writes a torch profiler trace of the requested steps (and profiling
  does not change the numbers: it is on in the selective run);
* a switch forced on without its hardware is a configuration error (exit 2) naming the key.
"""

from __future__ import annotations

import json

import pytest
from train_runner import base_overrides, run


def _scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {
        tag: {e.step: e.value for e in acc.Scalars(tag)}
        for tag in ("train/loss", "train/grad_norm")
    }


def _train(tmp_path, extra):
    result = run(base_overrides(tmp_path) + ["checkpoint.dir=null", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    return result, _scalars(tmp_path / "logs")


def test_selective_recompute_matches_and_profile_is_written(tmp_path):
    _, want = _train(tmp_path / "none", [])
    profile = ["logging.profile.start_step=2", "logging.profile.end_step=3"]
    result, got = _train(tmp_path / "selective", ["train.recompute=selective", *profile])
    for tag, steps in want.items():
        assert sorted(steps) == [1, 2, 3, 4]
        for step, value in steps.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    trace = tmp_path / "selective" / "logs" / "profile" / "trace_rank0_steps2-3.json"
    assert trace.is_file(), result.stdout[-2000:]
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("train_step ")}
    assert steps == {"train_step 2", "train_step 3"}  # exactly the requested steps
    assert any(e.get("name") == "aten::matmul" for e in events)  # the model's GEMMs


def test_forced_switch_without_support_is_a_config_error(tmp_path):
    result = run(base_overrides(tmp_path) + ["runtime.gradient_accumulation_fusion=true"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "runtime.gradient_accumulation_fusion" in result.stderr
    assert "CUDA" in result.stderr
