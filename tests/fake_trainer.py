"""A stand-in for ``pretrain/pretrain_mm.py`` that honours the training program's launch contract.

The launch scripts are tested against it until the real program lands:

* ``python tests/fake_trainer.py --config <yaml> [section.key=value ...]``, one process per rank.
  Under ``srun`` the rank comes from ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, under
  ``torchrun`` from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the rendezvous is
  ``MASTER_ADDR``/``MASTER_PORT`` (gloo). A world size above one without them is an error.
* Overrides used: ``train.iters`` (default 40), ``checkpoint.dir`` (required),
  ``checkpoint.interval`` (default 10), ``logging.dir``, ``runtime.stop_file``; any other
  key is accepted and ignored. Values from ``--config`` are read first when PyYAML is available.
* "Training" is plain SGD on a fixed least-squares problem with per-step, per-rank data and
  all-reduced gradients, in float64: the loss sequence is deterministic for a world size, and a
  lost or repeated step after a resume changes the final loss.
* Checkpoints: every ``save_interval`` steps, at the end and at a graceful stop, each rank writes
  ``iter_NNNNNNN/rank_RRRRR.json``; after a barrier rank 0 atomically rewrites
  ``latest_checkpointed_iteration.txt``. Every start resumes from it.
* SIGUSR1 or SIGTERM, or the stop file, makes all ranks stop at the next step boundary (the flag
  is all-reduced), save, and exit with status 75. Status 0: training finished.
* Rank 0 prints ``step 12/40 | loss 5.432100 | ...`` per step.

Test knobs (environment): ``FAKE_TRAINER_FAIL_AT_START=1`` exits with status 1 before doing
anything; ``FAKE_TRAINER_STEP_SECONDS`` (default 0.05) is the time one step takes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

EXIT_STOPPED = 75
TARGET = [1.0, -2.0, 0.5, 3.0]
LR = 0.05
BATCH = 8


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``section.key=value`` items as a flat dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"fake_trainer: bad override {item!r} (want section.key=value)")
        out[key] = value
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested YAML mapping -> ``section.key`` strings."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def load_settings(config: str, overrides: list[str]) -> dict[str, str]:
    """Config file values (if readable with PyYAML) updated by the overrides."""
    settings: dict[str, str] = {}
    if not Path(config).is_file():
        raise SystemExit(f"fake_trainer: config {config} not found")
    try:
        import yaml

        data = yaml.safe_load(Path(config).read_text()) or {}
        if isinstance(data, dict):
            settings.update(flatten(data))
    except ImportError:  # pragma: no cover - PyYAML is in the venv
        pass
    settings.update(parse_overrides(overrides))
    return settings


def dist_env() -> tuple[int, int, int, str]:
    """(rank, world size, local rank, launcher) from torchrun's or SLURM's variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            "torchrun",
        )
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", 0)),
            "srun",
        )
    return 0, 1, 0, "single"


class Trainer:
    """The fake training job of one rank."""

    def __init__(self, settings: dict[str, str]) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank, self.world, self.local_rank, self.launcher = dist_env()
        self.iters = int(settings.get("train.iters", 40))
        self.save_interval = int(settings.get("checkpoint.interval", 10))
        ckpt = settings.get("checkpoint.dir")
        if not ckpt:
            raise SystemExit("fake_trainer: checkpoint.dir is required")
        self.ckpt = Path(ckpt)
        self.stop_file = settings.get("runtime.stop_file") or None
        self.step_seconds = float(os.environ.get("FAKE_TRAINER_STEP_SECONDS", "0.05"))
        self.signal_name: str | None = None
        self.w = torch.zeros(len(TARGET), dtype=torch.float64)
        self.target = torch.tensor(TARGET, dtype=torch.float64)

    # -- distributed helpers
    def init_dist(self) -> None:
        """Join the gloo group through MASTER_ADDR/MASTER_PORT (no-op for one rank)."""
        if self.world == 1:
            return
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            raise SystemExit(
                f"fake_trainer: world size {self.world} but MASTER_ADDR/MASTER_PORT are not set"
            )
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world))
        self.dist.init_process_group(
            "gloo",
            init_method="env://",
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=120),
        )

    def all_reduce(self, t: object, op: str = "sum") -> object:
        if self.world > 1:
            red = self.dist.ReduceOp.MAX if op == "max" else self.dist.ReduceOp.SUM
            self.dist.all_reduce(t, op=red)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    # -- checkpoints
    def latest(self) -> int:
        f = self.ckpt / "latest_checkpointed_iteration.txt"
        return int(f.read_text().strip()) if f.is_file() else 0

    def load(self) -> int:
        it = self.latest()
        if it == 0:
            return 0
        path = self.ckpt / f"iter_{it:07d}" / f"rank_{self.rank:05d}.json"
        state = json.loads(path.read_text())
        if state["world_size"] != self.world:
            raise SystemExit(
                f"fake_trainer: checkpoint {it} has world size {state['world_size']}, "
                f"this run {self.world}"
            )
        self.w = self.torch.tensor(state["w"], dtype=self.torch.float64)
        return it

    def save(self, it: int) -> None:
        d = self.ckpt / f"iter_{it:07d}"
        d.mkdir(parents=True, exist_ok=True)
        state = {"iteration": it, "world_size": self.world, "w": self.w.tolist()}
        tmp = d / f".rank_{self.rank:05d}.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(d / f"rank_{self.rank:05d}.json")
        self.barrier()
        if self.rank == 0:
            tmp = self.ckpt / ".latest_checkpointed_iteration.txt.tmp"
            tmp.write_text(f"{it}\n")
            tmp.replace(self.ckpt / "latest_checkpointed_iteration.txt")
        self.barrier()

    # -- the loop
    def on_signal(self, signum: int, _frame: object) -> None:
        """Only records the request; the loop saves at the next step boundary."""
        self.signal_name = signal.Signals(signum).name

    def step(self, it: int) -> float:
        torch = self.torch
        g = torch.Generator().manual_seed(1000 * it + self.rank)
        x = torch.randn(BATCH, len(TARGET), generator=g, dtype=torch.float64)
        err = x @ self.w - x @ self.target
        loss_and_grad = torch.cat([(err * err).mean().reshape(1), 2.0 * x.T @ err / BATCH])
        self.all_reduce(loss_and_grad)
        loss_and_grad /= self.world
        self.w -= LR * loss_and_grad[1:]
        return float(loss_and_grad[0])

    def stop_requested(self) -> str | None:
        reason = self.signal_name
        if reason is None and self.stop_file and os.path.exists(self.stop_file):
            reason = f"stop file {self.stop_file}"
        flag = self.torch.tensor([1.0 if reason else 0.0])
        self.all_reduce(flag, op="max")
        if flag.item() > 0:
            return reason or "another rank"
        return None

    def run(self) -> int:
        signal.signal(signal.SIGUSR1, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.init_dist()
        start = self.load()
        if self.rank == 0:
            print(
                f"fake_trainer: launcher {self.launcher}, world size {self.world}, "
                f"master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, "
                f"resuming from iteration {start}, training to {self.iters}",
                flush=True,
            )
        it = start
        while it < self.iters:
            reason = self.stop_requested()
            if reason:
                if it > self.latest():
                    self.save(it)
                if self.rank == 0:
                    print(
                        f"fake_trainer: graceful stop at iteration {it} ({reason}); "
                        f"checkpoint saved; exit {EXIT_STOPPED}",
                        flush=True,
                    )
                return EXIT_STOPPED
            it += 1
            loss = self.step(it)
            time.sleep(self.step_seconds)
            if self.rank == 0:
                print(
                    f"step {it}/{self.iters} | loss {loss:.10f} | lr {LR:.3g} | world {self.world}",
                    flush=True,
                )
            if it % self.save_interval == 0 or it == self.iters:
                self.save(it)
        if self.rank == 0:
            print(f"fake_trainer: training finished at iteration {it}", flush=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fake training program for the launch tests")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    rank = dist_env()[0]
    if os.environ.get("FAKE_TRAINER_FAIL_AT_START") == "1":
        print(
            f"fake_trainer: rank {rank}: failing at start (FAKE_TRAINER_FAIL_AT_START=1)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    trainer = Trainer(load_settings(args.config, args.overrides))
    try:
        return trainer.run()
    finally:
        if trainer.world > 1 and trainer.dist.is_initialized():
            trainer.dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
