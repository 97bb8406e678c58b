"""Pretrain Memory Mosaics v2 (or the transformer baseline) on Megatron-Core.

    torchrun --nproc-per-node 8 pretrain/pretrain_mm.py --config pretrain/configs/mm_8b.yaml \
        checkpoint.dir=/ckpt/mm8b logging.dir=/logs/mm8b data.train_blend=[1.0,/data/c4_text]

Under srun (one task per GPU) ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and
the rendezvous from MASTER_ADDR/MASTER_PORT. Exit status: 0 finished; 75 stopped on request
(signal, stop file, time limit) with a checkpoint saved, to be requeued; 2 configuration
error; 1 failure.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _print_once(message: str) -> None:
    """Print an error that every rank hits alike on the first rank only (not once per rank)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank == "0":
        print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, train, and return the exit status."""
    # First of all: a stop signal during start-up (imports, model build, checkpoint load) is
    # recorded and honoured at the first step boundary instead of killing the process.
    from pretrain.stopping import install_stop_handlers

    install_stop_handlers()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)

    from mm_megatron.config_loading import ConfigError
    from pretrain.config import load_train_config
    from pretrain.stopping import EXIT_CONFIG

    try:
        cfg = load_train_config(args.config, args.overrides)
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        cfg.data_parallel_size(world)  # layout errors before any process group exists
    except ConfigError as err:
        _print_once(f"config error: {err}")
        return EXIT_CONFIG

    import torch.distributed as dist

    from pretrain.checkpointing import CheckpointError
    from pretrain.ckpt_space import CheckpointSpaceError
    from pretrain.distributed import init_distributed
    from pretrain.trainer import run

    env, device = init_distributed(cfg.runtime.init_timeout_minutes)
    try:
        return run(cfg, env.world_size, device)
    except (ConfigError, CheckpointError, CheckpointSpaceError) as err:
        _print_once(f"error: {err}")  # the same on every rank
        return EXIT_CONFIG
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
