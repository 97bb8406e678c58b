"""Process-group set-up from the launcher's environment (torchrun, srun, or a plain run)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str


def read_dist_env() -> DistEnv:
    """Ranks from torchrun (RANK/WORLD_SIZE/LOCAL_RANK), else from srun (SLURM_PROCID/
    SLURM_NTASKS/SLURM_LOCALID, one task per GPU), else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in env:
                raise RuntimeError(
                    f"{name} is not set: under srun the launch script must export the "
                    "rendezvous host and port (see launch/common.sh)"
                )
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            "srun",
        )
    return DistEnv(0, 1, 0, "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_collective_timeout(minutes: float) -> int:
    """Set the timeout of every process group this rank belongs to; returns how many.

    Called after the first step, as torchtitan does: start-up needs a long timeout
    (compilation, checkpoint load), a stuck collective later should fail much sooner.
    """
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    count = 0
    for group in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(timedelta(minutes=minutes), group)
            count += 1
        except (ValueError, AssertionError, RuntimeError):
            continue  # not a member, or a backend without a settable timeout
    return count


def init_distributed(timeout_minutes: float = 30) -> tuple[DistEnv, torch.device]:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) and pick this rank's device.

    On CPU it also enables the megatron-core CPU compatibility (mm_megatron.cpu_compat).
    """
    from datetime import timedelta

    env = read_dist_env()
    if env.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        from mm_megatron.cpu_compat import enable_cpu_mode

        enable_cpu_mode()
        if "OMP_NUM_THREADS" not in os.environ:  # one share of the cores per local rank
            local = int(
                os.environ.get(
                    "LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", env.world_size)
                )
            )
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return env, device
