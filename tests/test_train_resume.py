"""Checkpoints, resume and stopping: a resumed run continues the uninterrupted one step for
step, whatever stopped it (SIGKILL, SIGUSR1, a time slice) and whatever layout resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from paths import ROOT
from train_runner import base_overrides, command, env, losses, run

ITERS = ["train.iters=6", "checkpoint.interval=2"]
_REFERENCE: dict[str, dict] = {}


def _uninterrupted(tmp_path_factory) -> dict[int, tuple[float, float]]:
    if "mm" not in _REFERENCE:
        tmp = tmp_path_factory.mktemp("uninterrupted")
        result = run(base_overrides(tmp) + ITERS)
        assert result.returncode == 0, result.stderr[-3000:]
        _REFERENCE["mm"] = losses(result.stdout)
        assert sorted(_REFERENCE["mm"]) == [1, 2, 3, 4, 5, 6]
    return _REFERENCE["mm"]


def _latest(tmp: Path) -> int | None:
    tracker = tmp / "ckpt" / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.exists() else None


def _assert_continues(resumed: dict, reference: dict, first: int, rel: float = 1e-6) -> None:
    assert sorted(resumed) == list(range(first, 7)), resumed
    for step in range(first, 7):
        assert resumed[step][0] == pytest.approx(reference[step][0], rel=rel), step
        assert resumed[step][1] == pytest.approx(reference[step][1], rel=max(rel, 1e-5)), step


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tmp_path_factory):
    reference = _uninterrupted(tmp_path_factory)
    args = base_overrides(tmp_path) + ITERS
    proc = subprocess.Popen(
        command(args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while (_latest(tmp_path) or 0) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, helpers included, as SLURM would
    proc.wait()
    saved = _latest(tmp_path)
    assert saved in (2, 4), saved
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {tmp_path / 'ckpt' / f'iter_{saved:07d}'}" in result.stdout
    _assert_continues(losses(result.stdout), reference, saved + 1)


def test_sigusr1_saves_exits_75_and_resumes(tmp_path, tmp_path_factory):
    reference = _uninterrupted(tmp_path_factory)
    args = base_overrides(tmp_path) + ITERS + ["checkpoint.interval=100"]
    proc = subprocess.Popen(
        command(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=240) == 75, "".join(out)[-2000:]
    text = "".join(out)
    assert "stop requested (signal)" in text
    stopped = _latest(tmp_path)
    assert stopped is not None and stopped >= 2
    assert max(losses(text)) == stopped  # no step after the agreed boundary
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_continues(losses(result.stdout), reference, stopped + 1)


LAYOUTS = {  # (processes, overrides of the first run, overrides kept on resume)
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"], []),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"], []),
    "dp2_distopt": (2, [], ["parallel.use_distributed_optimizer=true"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_in_another_layout(tmp_path, tmp_path_factory, layout):
    """Stop a TP=2 (PP=2, DP=2 with the distributed optimizer) run after 2 steps; resume it
    in one process: the same losses as the uninterrupted single-process run."""
    reference = _uninterrupted(tmp_path_factory)
    nproc, extra, kept = LAYOUTS[layout]
    first = run(
        base_overrides(tmp_path) + ITERS + extra + kept + ["runtime.exit_interval=2"], nproc=nproc
    )
    # torchrun reports a worker's status 75 as its own failure (srun passes it through).
    assert first.returncode != 0 and "exitcode  : 75" in first.stderr, first.stderr[-3000:]
    assert "stop requested (exit interval) at step 2" in first.stdout
    assert _latest(tmp_path) == 2
    result = run(base_overrides(tmp_path) + ITERS + kept)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_continues(losses(result.stdout), reference, 3, rel=1e-4)


def test_damaged_latest_checkpoint_falls_back(tmp_path, tmp_path_factory):
    reference = _uninterrupted(tmp_path_factory)
    args = base_overrides(tmp_path) + ITERS
    first = run(args + ["runtime.exit_interval=4"])
    assert first.returncode == 75 and _latest(tmp_path) == 4
    shard = next((tmp_path / "ckpt" / "iter_0000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated by a crash or a full disk
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping damaged checkpoint" in result.stdout
    assert "resuming from the previous complete checkpoint" in result.stdout
    _assert_continues(losses(result.stdout), reference, 3)

    for ckpt in (tmp_path / "ckpt").glob("iter_*"):
        (ckpt / "common.pt").unlink()
    broken = run(args)
    assert broken.returncode == 2
    assert "refusing to start from scratch" in broken.stderr


def test_corruption_that_keeps_sizes_and_failed_loads_fall_back(tmp_path, tmp_path_factory):
    """Zeros written over part of a shard keep its size: the manifest's sha256 catches them.
    A checkpoint that passes verification but fails to load (here one saved without hashes)
    falls back too, with a message, instead of failing every start on the same checkpoint."""
    reference = _uninterrupted(tmp_path_factory)
    args = base_overrides(tmp_path) + ITERS
    first = run(args + ["runtime.exit_interval=4"])
    assert first.returncode == 75 and _latest(tmp_path) == 4
    newest = tmp_path / "ckpt" / "iter_0000004"
    manifest = json.loads((newest / "mm_checkpoint.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"])
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    start, length = len(data) // 4, min(4 << 20, len(data) // 2)
    data[start : start + length] = bytes(length)
    shard.write_bytes(data)  # same size
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{shard.name} does not match its sha256 in the manifest" in result.stdout
    assert "resuming from the previous complete checkpoint" in result.stdout
    _assert_continues(losses(result.stdout), reference, 3)

    newest = tmp_path / "ckpt" / "iter_0000006"
    manifest = json.loads((newest / "mm_checkpoint.json").read_text())
    del manifest["sha256"]  # as saved before checksums existed
    (newest / "mm_checkpoint.json").write_text(json.dumps(manifest))
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(bytes(shard.stat().st_size))
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipping checkpoint that failed to load: {newest}" in again.stdout
    assert "resuming from the previous complete checkpoint" in again.stdout
    _assert_continues(losses(again.stdout), reference, 5)


def test_non_finite_loss_stops_without_saving(tmp_path):
    args = base_overrides(tmp_path) + [
        "train.iters=4",
        "checkpoint.interval=1",
        "optimizer.lr=1e30",
        "optimizer.warmup_iters=0",
    ]
    result = run(args)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "non-finite loss" in result.stdout
    bad_step = int(result.stdout.split("non-finite loss")[1].split("at step ")[1].split(";")[0])
    assert _latest(tmp_path) == bad_step - 1
    assert not (tmp_path / "ckpt" / f"iter_{bad_step:07d}").exists()


def test_async_checkpoints_resume(tmp_path, tmp_path_factory):
    """Background checkpoint writes: published only when complete, and resumable."""
    reference = _uninterrupted(tmp_path_factory)
    args = (
        base_overrides(tmp_path) + ITERS + ["checkpoint.async_save=true", "checkpoint.keep_last=1"]
    )
    first = run(args + ["runtime.exit_interval=4"])
    assert first.returncode == 75, first.stderr[-3000:]
    assert "scheduled asynchronous save" in first.stdout
    assert _latest(tmp_path) == 4
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*")) == ["iter_0000004"]
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_continues(losses(result.stdout), reference, 5)


def _catches_usr1(pid: int) -> bool:
    """Whether the process has a handler for SIGUSR1 (the SigCgt mask of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught >> (signal.SIGUSR1 - 1) & 1)


def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_sigusr1_during_startup_exits_75_without_saving(tmp_path):
    """The stop handler is the program's first act (before torch is even loaded); a stop
    before the first step exits 75 and saves nothing."""
    args = base_overrides(tmp_path) + ITERS
    proc = subprocess.Popen(
        command(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while not _catches_usr1(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    early = not _torch_loaded(proc.pid)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=240)[0]
    assert early, "the SIGUSR1 handler was installed only after torch was loaded"
    assert proc.returncode == 75, out[-3000:]
    assert "stop requested (signal) before the first step of this start (step 0)" in out
    assert _latest(tmp_path) is None and not list((tmp_path / "ckpt").glob("iter_*"))


def test_init_from_an_unfinished_run_is_refused(tmp_path):
    """A later stage (checkpoint.init_from) refuses a checkpoint that is not the final
    iteration of its run, naming the chaining to use instead."""
    first = run(base_overrides(tmp_path / "pre") + ITERS + ["runtime.exit_interval=2"])
    assert first.returncode == 75, first.stderr[-3000:]
    args = base_overrides(tmp_path / "ft") + ITERS + [f"checkpoint.init_from={tmp_path}/pre/ckpt"]
    refused = run(args)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "is iteration 2 of 6: the run that saved it has not finished" in refused.stderr
    assert "--dependency=afterok" in refused.stderr


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_full_disk_fails_clearly_and_does_not_retrain(tmp_path):
    """A checkpoint directory with room for one checkpoint: stale .tmp of an earlier start is
    removed; the second save fails naming the space; the next start refuses before training."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "3500k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        root = small / "ckpt"
        (root / "iter_0000001.tmp").mkdir(parents=True)
        (root / "iter_0000001.tmp" / "__0_0.distcp").write_bytes(bytes(1000))
        args = base_overrides(tmp_path) + ITERS + [f"checkpoint.dir={root}"]
        first = run(args)
        assert first.returncode == 2, first.stdout[-2000:] + first.stderr[-3000:]
        assert (
            "removed unpublished checkpoint directories of earlier starts: "
            "['iter_0000001.tmp']" in first.stdout
        )
        assert f"checkpoint save failed: no space left on device in {root}" in first.stderr
        assert not list(root.glob("*.tmp")) and _latest_in(root) == 2
        second = run(args)
        assert second.returncode == 2
        assert f"not enough space for checkpoints in {root}" in second.stderr
        assert not losses(second.stdout), "trained although the next save cannot fit"
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def _latest_in(root: Path) -> int | None:
    tracker = root / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.exists() else None
