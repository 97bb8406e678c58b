"""The hang watchdog (pretrain/watchdog.py): blame from heartbeats, and what a trip prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from paths import ROOT

from pretrain.watchdog import Watchdog


def heartbeat(d: Path, rank: int, step: int, node: str, age: float = 0.0) -> None:
    path = d / f"rank_{rank:05d}.json"
    path.write_text(json.dumps({"rank": rank, "node": node, "pid": 100 + rank, "step": step}))
    then = time.time() - age
    os.utime(path, (then, then))


def test_stale_heartbeat_names_the_frozen_rank(tmp_path: Path) -> None:
    heartbeat(tmp_path, 0, 8, "n1")
    heartbeat(tmp_path, 1, 7, "n2", age=120)
    blame = Watchdog(20, 0, str(tmp_path)).suspects()
    assert len(blame) == 1 and blame[0].startswith("rank 1 on n2 (pid 101, step 7): no heartbeat")


def test_lagging_step_names_the_stuck_rank(tmp_path: Path) -> None:
    for rank, step in enumerate([8, 8, 7, 8]):
        heartbeat(tmp_path, rank, step, f"n{rank + 1}")
    blame = Watchdog(20, 0, str(tmp_path), world_size=4).suspects()
    assert blame == ["rank 2 on n3 (pid 102): still at step 7 while others finished step 8"]


def test_rank_without_heartbeat_is_named(tmp_path: Path) -> None:
    heartbeat(tmp_path, 0, 3, "n1")
    blame = Watchdog(20, 0, str(tmp_path), world_size=2).suspects()
    assert blame == ["rank 1: no heartbeat at all (frozen or dead since its first step)"]


def test_trip_dumps_stacks_and_exits_1(tmp_path: Path) -> None:
    heartbeat(tmp_path, 1, 3, "n2", age=300)
    code = (
        "import time; from pretrain.watchdog import Watchdog; "
        f"w = Watchdog(1.0, 0, {str(tmp_path)!r}); w.beat(4); w.start(); time.sleep(30)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SLURMD_NODENAME": "n1"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "WATCHDOG: rank 0 on n1" in proc.stderr and "after step 4" in proc.stderr
    assert "hung: rank 1 on n2 (pid 101, step 3): no heartbeat" in proc.stderr
    assert "most recent call first" in proc.stderr  # faulthandler's stack dump
