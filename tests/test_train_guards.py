"""Guards for a months-long run, each shown firing through the training CLI: config drift
on resume, bad batches and loss spikes, retention with milestones, metrics (step time
without validation and checkpoints, W&B, MM telemetry, data wait)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paths import ROOT
from train_runner import base_overrides, command, env, losses, run

from mm_megatron.config_loading import ConfigError
from pretrain import retention
from pretrain.config import load_train_config

TINY = str(ROOT / "pretrain" / "configs" / "tiny_mm.yaml")
LR = __import__("re").compile(r"^step (\d+)/\d+ \| loss [0-9.]+ \| lr ([0-9.e+-]+)")


def _lrs(stdout: str) -> dict[int, float]:
    out = {}
    for line in stdout.splitlines():
        match = LR.match(line.strip())
        if match:
            out[int(match.group(1))] = float(match.group(2))
    return out


def test_config_drift_on_resume(tmp_path):
    """Shape and sequence-length changes are refused; an LR change needs
    checkpoint.allow_changes=[lr_schedule], and then the new schedule is the one used."""
    args = base_overrides(tmp_path) + ["train.iters=6", "checkpoint.interval=100"]
    first = run(args + ["runtime.exit_interval=2"])
    assert first.returncode == 75, first.stderr[-3000:]

    refused = run(args + ["model.seq_length=32", "optimizer.lr=1e-3"])
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "model.seq_length: 64 -> 32 (would corrupt the run; refused)" in refused.stderr
    assert (
        "optimizer.lr: 0.003 -> 0.001 (a lr_schedule change: add lr_schedule to "
        "checkpoint.allow_changes" in refused.stderr
    )

    accepted = run(
        args
        + ["optimizer.lr=1e-3", "checkpoint.allow_changes=[lr_schedule]", "runtime.exit_interval=1"]
    )
    assert accepted.returncode == 75, accepted.stderr[-3000:]
    assert (
        "config change on resume, accepted by checkpoint.allow_changes (lr_schedule): "
        "optimizer.lr: 0.003 -> 0.001"
    ) in accepted.stdout
    # Megatron's cosine schedule after step 3 of 6 (1 warm-up step), from the new peak LR.
    ratio = (3 - 1) / (6 - 1)
    expected = 1e-5 + 0.5 * (math.cos(math.pi * ratio) + 1) * (1e-3 - 1e-5)
    assert _lrs(accepted.stdout)[3] == pytest.approx(expected, rel=1e-3)


def test_bad_batches_are_skipped_within_the_budget(tmp_path):
    """A NaN batch within train.skip_bad_batches gets no update: the run continues exactly as
    one that skips that iteration's batch (train.iterations_to_skip); one more bad batch
    stops the run with status 1. The spike detector logs."""
    args = base_overrides(tmp_path) + ["checkpoint.interval=100", "train.iters=5"]
    cmd = command(args + ["train.skip_bad_batches=1"])
    cmd[1] = str(ROOT / "tests" / "train_fault_entry.py")
    bad = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**env(), "MM_TEST_NAN_STEPS": "3,5"},
    )
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "skipped bad batch at step 3" in bad.stdout
    assert "bad batch at step 5 exceeds train.skip_bad_batches=1" in bad.stdout
    assert "non-finite loss nan" in bad.stdout

    skip = run(
        base_overrides(tmp_path / "skip")
        + [
            "checkpoint.interval=100",
            "train.iters=5",
            "runtime.exit_interval=4",
            "train.iterations_to_skip=[3]",
            "train.spike_factor=0.5",
            "train.spike_window=2",
        ]
    )
    assert skip.returncode == 75, skip.stderr[-3000:]
    assert "skipped iteration 3 (train.iterations_to_skip)" in skip.stdout
    assert "loss spike at step 4" in skip.stdout
    a, b = losses(bad.stdout), losses(skip.stdout)
    assert 3 not in a and 3 not in b
    assert a[4] == pytest.approx(b[4], rel=1e-6) and a[4][0] != a[2][0]


FAKE_WANDB = """
import json, os
def _write(record):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")
class util:
    @staticmethod
    def generate_id():
        return "fake-run-id"
class _Run:
    def log(self, data, step=None):
        _write({"step": step, "data": data})
    def finish(self):
        _write({"finish": True})
def init(**kwargs):
    _write({"init": kwargs})
    return _Run()
"""


def test_metrics_wandb_telemetry_and_milestones(tmp_path):
    """Step time without validation/checkpoint time; W&B (a fake module); MM telemetry in
    TensorBoard; data wait; retention in the background keeps the milestones."""
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb.jsonl"
    args = base_overrides(tmp_path) + [
        "train.iters=4",
        "logging.eval_interval=2",
        "logging.eval_iters=12",
        "logging.telemetry_interval=2",
        "logging.wandb_project=mm-test",
        "checkpoint.interval=1",
        "checkpoint.keep_last=1",
        "checkpoint.milestone_interval=2",
    ]
    environ = {
        **env(),
        "FAKE_WANDB_LOG": str(log),
        "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        command(args), capture_output=True, text=True, timeout=300, cwd=ROOT, env=environ
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["init"]["project"] == "mm-test" and records[-1] == {"finish": True}
    by_step: dict[int, dict] = {}
    for r in records[1:-1]:
        by_step.setdefault(r["step"], {}).update(r["data"])
    for step in (1, 2, 3, 4):
        assert by_step[step]["train/data_wait_s"] >= 0
    # Validation and the checkpoint of step 2 ran in step 3's window but are not its time.
    assert by_step[3]["train/excluded_s"] > by_step[3]["train/step_time_s"]
    assert "valid/loss" in by_step[2]
    for tag in (
        "long/beta0",
        "long/alpha_psi",
        "short/gate",
        "short/decay",
        "long/output_norm",
        "long/empty_rows",
        "short/output_norm",
    ):
        assert f"mm/layer01/{tag}" in by_step[2] and f"mm/layer02/{tag}" in by_step[4], tag
    assert 0 < by_step[2]["mm/layer01/long/empty_rows"] < 1
    assert "mm/layer01/long/beta0" not in by_step[3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"histograms": 0}).Reload()
    assert "mm/layer01/long/beta0" in events.Tags()["histograms"]
    assert "mm/layer02/short/gate" in events.Tags()["scalars"]

    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000002", "iter_0000004"], kept  # milestone 2 and the newest
    assert "in the background" in result.stdout


def test_retention_deletes_off_the_calling_thread(tmp_path, monkeypatch):
    for i in (1, 2, 3, 4, 5):
        (tmp_path / f"iter_{i:07d}").mkdir()
    (tmp_path / "iter_0000009.deleting").mkdir()  # left by an interrupted deletion

    real_rmtree = shutil.rmtree

    def slow_rmtree(path, ignore_errors=False):  # a checkpoint of many terabytes
        time.sleep(1.0)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(retention.shutil, "rmtree", slow_rmtree)

    def listing(root):
        return sorted(int(p.name[5:]) for p in Path(root).glob("iter_*") if p.name[5:].isdigit())

    start = time.perf_counter()
    renamed = retention.schedule(tmp_path, 1, 5, listing)
    assert time.perf_counter() - start < 0.5  # the deletion runs in the background
    assert listing(tmp_path) == [5]  # renamed away at once
    assert len(renamed) == 5
    retention.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005"]
    assert retention.doomed([2, 4, 6, 7, 8], 1, 8, milestone_interval=4) == [2, 6, 7]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["logging.wandb_project=x"], r"logging\.wandb_project: .*wandb package is not installed"),
        (["checkpoint.milestone_interval=3"], r"milestone_interval: 3 is not a multiple"),
        (["checkpoint.allow_changes=[model]"], r"checkpoint\.allow_changes\[0\]: 'model' is not"),
        (["train.skip_bad_batches=-1"], r"train\.skip_bad_batches: must be >= 0"),
        (["train.iterations_to_skip=[0]"], r"train\.iterations_to_skip: iterations are 1-based"),
        (["logging.telemetry_interval=0"], r"logging\.telemetry_interval: must be >= 1"),
    ],
)
def test_guard_settings_are_validated(overrides, message):
    if "wandb" in overrides[0] and "wandb" in sys.modules:
        pytest.skip("a wandb module is importable here")
    with pytest.raises(ConfigError, match=message):
        load_train_config(TINY, overrides)


def test_datasets_built_once_per_tensor_parallel_group(tmp_path):
    """TP=2: only TP rank 0 builds the datasets (and index files); rank 1 receives batches."""
    result = run(
        base_overrides(tmp_path)
        + ["train.iters=2", "checkpoint.interval=100", "parallel.tensor_model_parallel_size=2"],
        nproc=2,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "datasets built on 1 of 2 ranks" in result.stdout
    assert sorted(losses(result.stdout)) == [1, 2]
