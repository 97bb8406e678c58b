"""Validate a training job before allocating it (launch/check.sh runs this on the login node).

    python tools/check_job.py --config CFG --nodes N --tasks-per-node T [--time-limit S]
        [--signal-lead S] [section.key=value ...]

Loads the config with the overrides the job would pass and checks what can fail later:
unknown keys and values, the parallel layout against nodes x tasks, the tokenizer, the data
prefixes, the checkpoint directory (resume state, free space for keep_last + 1 checkpoints),
checkpoint.init_from, and the time limit against the signal lead. Prints the plan and every
problem; exit status 0 when none, 2 otherwise. Needs no GPU, no process group, no SLURM.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

BYTES_PER_PARAMETER = 14  # as pretrain/ckpt_space.py


def main(argv: list[str] | None = None) -> int:
    """Check the job; print the plan and the problems; 0 if none, else 2."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--tasks-per-node", type=int, required=True)
    p.add_argument("--time-limit", type=int, default=None, help="seconds (none: unknown)")
    p.add_argument("--signal-lead", type=int, default=None, help="seconds (none: unknown)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from mm_megatron.config_loading import ConfigError
    from pretrain.config import load_train_config

    problems: list[str] = []
    plan: list[str] = []
    world = args.nodes * args.tasks_per_node
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config: {err}")
        print("CHECK FAILED: 1 problem")
        return 2
    par = cfg.parallel
    try:
        dp = cfg.data_parallel_size(world)
        plan.append(
            f"world {world} = {args.nodes} nodes x {args.tasks_per_node} tasks: tp "
            f"{par.tensor_model_parallel_size} pp {par.pipeline_model_parallel_size} "
            f"dp {dp}, {cfg.num_microbatches(world)} micro-batches of "
            f"{cfg.train.micro_batch_size}"
        )
    except ConfigError as err:
        problems.append(f"layout: {err}")
    plan.append(
        f"{cfg.train_iters:,} iterations of {cfg.tokens_per_iter:,} tokens "
        f"({cfg.train_iters * cfg.tokens_per_iter:,} tokens)"
    )
    if not cfg.data.mock:
        from pretrain.data import check_blends_exist
        from pretrain.trainer import load_run_tokenizer

        for check, what in ((check_blends_exist, "data"), (load_run_tokenizer, "tokenizer")):
            try:
                check(cfg)
            except ConfigError as err:
                problems.append(f"{what}: {err}")
    problems += _check_checkpoints(cfg, plan)
    if args.time_limit and args.signal_lead is not None:
        plan.append(f"time limit {args.time_limit} s, signal lead {args.signal_lead} s")
        if args.signal_lead >= args.time_limit:
            problems.append(
                f"time limit: {args.time_limit} s is not longer than the signal "
                f"lead {args.signal_lead} s: no start could train"
            )
    for line in plan:
        print(f"plan: {line}")
    for line in problems:
        print(f"problem: {line}")
    if problems:
        print(f"CHECK FAILED: {len(problems)} problem{'s' * (len(problems) > 1)}")
        return 2
    print("CHECK OK")
    return 0


def _check_checkpoints(cfg: object, plan: list[str]) -> list[str]:
    """Resume state, space and init_from; returns the problems, appends to ``plan``."""
    from mm_megatron.checkpoint.format import TRACKER, list_checkpoints
    from mm_megatron.flops import count_params

    problems = []
    root = cfg.checkpoint.dir
    if not root:
        plan.append("no checkpoint.dir: nothing is saved, a requeue restarts from scratch")
        return problems
    base = Path(root)
    tracker = base / TRACKER
    state = (
        f"resumes from iteration {tracker.read_text().strip()}"
        if tracker.exists()
        else "starts fresh"
    )
    plan.append(f"checkpoints in {base} ({state}; complete: {list_checkpoints(base) or 'none'})")
    size = BYTES_PER_PARAMETER * count_params(cfg.model).total
    keep = cfg.checkpoint.keep_last
    slots = keep + 1 if keep is not None else 1
    probe = base
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    plan.append(
        f"a checkpoint takes about {size:,} bytes; room for {slots} (keep_last + 1): "
        f"{slots * size:,} bytes; {free:,} free"
    )
    if free < slots * size:
        problems.append(
            f"checkpoint.dir: {free:,} bytes free in {probe}, {slots * size:,} "
            "needed (lower checkpoint.keep_last or free space)"
        )
    src = cfg.checkpoint.init_from
    if src and not tracker.exists() and not list_checkpoints(src):
        problems.append(f"checkpoint.init_from: no complete checkpoint in {src}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
