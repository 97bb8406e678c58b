"""Training throughput of MM v2 against the transformer baseline of the same size.

    python benchmarks/bench_train.py [--config pretrain/configs/tiny_mm.yaml] [--steps 8]
        [--repeats 3] [key=value ...]

Both models are built in this one process from the same config (the baseline takes the
``model`` section with ``arch: transformer``) and trained on the same random batches through
the real training path (Megatron DDP, optimizer, pipeline schedule), in interleaved repeats
so machine noise hits both alike. Reports ms/step, tokens/s and the MM/transformer ratio;
bf16 and FlexAttention on a GPU, fp32 and the dense memories on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pretrain/configs/tiny_mm.yaml")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch

    from mm_megatron.flops import training_flops_per_token
    from mm_megatron.model import init_model_parallel
    from pretrain.components import Components
    from pretrain.config import load_train_config
    from pretrain.data import BatchStream, build_datasets
    from pretrain.distributed import init_distributed
    from pretrain.steps import train_step
    from pretrain.trainer import load_run_tokenizer

    base = load_train_config(
        args.config, ["data.mock=true", "checkpoint.dir=null", "logging.dir=null", *args.overrides]
    )
    env, device = init_distributed()
    init_model_parallel(base.parallel, base.train.seed)
    runs = {}
    for arch in ("mm", "transformer"):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch))
        parts = Components.build(cfg, device)  # each model has its own config and hooks
        tok, _ = load_run_tokenizer(cfg)  # mock data: the config's vocabulary
        total = (args.warmup + args.steps) * args.repeats + 1
        train_ds, _, _ = build_datasets(cfg, tok, [total * cfg.train.global_batch_size, 0, 0])
        stream = [BatchStream(train_ds, cfg.train.micro_batch_size, 0, 1, 0, device)]
        params = sum(p.numel() for p in parts.model[0].parameters())
        runs[arch] = dict(cfg=cfg, parts=parts, stream=stream, params=params, times=[], step=0)

    def steps(run: dict, n: int) -> float:
        cfg = run["cfg"]
        micro = cfg.num_microbatches(1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            run["step"] += 1
            p = run["parts"]
            train_step(cfg, p.model, p.optimizer, p.scheduler, run["stream"], micro, run["step"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    for _ in range(args.repeats):
        for run in runs.values():
            steps(run, args.warmup)
            run["times"].append(steps(run, args.steps))

    cfg = base
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    print(
        f"device {device}, {torch.get_num_threads()} threads, seq {cfg.model.seq_length}, "
        f"global batch {cfg.train.global_batch_size}, "
        f"{args.repeats} x {args.steps} steps"
    )
    print(f"{'model':<12} {'params':>10} {'ms/step':>9} {'tokens/s':>10} {'GFLOP/token':>12}")
    for arch, run in runs.items():
        t = statistics.median(run["times"])
        flops = training_flops_per_token(run["cfg"].model) / 1e9
        row = f"{arch:<12} {run['params']:>10,} {1000 * t:>9.1f} {tokens / t:>10,.0f}"
        print(f"{row} {flops:>12.3f}")
    from mm_megatron.packed import uses_packed_sequences

    packed = uses_packed_sequences(runs["transformer"]["cfg"].model)
    masking = "THD packed documents (TE)" if packed else "dense document-causal mask"
    print(f"transformer attention: document-wise, {masking} (same documents as the memories)")
    ratio = statistics.median(runs["mm"]["times"]) / statistics.median(runs["transformer"]["times"])
    print(f"MM v2 / transformer step time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
