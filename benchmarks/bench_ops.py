"""Time the fast MM v2 ops against their references, forward + backward, in one process.

* gated key extractor (Eq. 8): chunked log-space scan vs the T-step recurrence;
* memory reads (Eq. 4, masks of Eq. 10): each backend of ``memory_attention`` vs the dense
  masked softmax, for the short-term (window h) and long-term (offset m) memories.

Ratios are reference time / candidate time (> 1: the fast path is faster). On CPU the
FlexAttention path runs eagerly (torch materialises the scores there), so its CPU figures
say nothing about the fused CUDA kernel.

    python benchmarks/bench_ops.py                      # CUDA if present, else small CPU run
    python benchmarks/bench_ops.py --device cpu --seq-len 1024 --heads 4 --head-dim 64
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from mm_megatron.ops import (
    gated_keys_chunked,
    gated_keys_naive,
    memory_attention,
)
from mm_megatron.ops.memory_attention import HAS_FLEX


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None, help="default 4096 on CUDA, 1024 CPU")
    p.add_argument("--batch", type=int, default=None, help="default 2 on CUDA, 1 on CPU")
    p.add_argument("--heads", type=int, default=None, help="default 16 on CUDA, 4 on CPU")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 on CUDA, 64 on CPU")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--chunk", type=int, default=64, help="chunk size of the key scan")
    p.add_argument("--stm-window", type=int, default=256, help="h of the short-term memory")
    p.add_argument("--ltm-offset", type=int, default=64, help="m of the long-term memory")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-naive-scan", action="store_true", help="the T-step loop is slow")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.seq_len = args.seq_len or (4096 if cuda else 1024)
    args.batch = args.batch or (2 if cuda else 1)
    args.heads = args.heads or (16 if cuda else 4)
    args.head_dim = args.head_dim or (128 if cuda else 64)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    return args


def time_fwd_bwd(
    fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], repeats: int, device: torch.device
) -> float:
    """Median seconds of forward + backward (one warm-up call, which also compiles)."""

    def once() -> None:
        for x in leaves:
            x.grad = None
        fn().float().sum().backward()

    once()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def doc_pos_for(batch: int, T: int, device: torch.device) -> torch.Tensor:
    """Packed rows: documents of T/2, T/4, T/8, ... tokens (one long document if T is tiny)."""
    rows = []
    for _ in range(batch):
        pos, left, n = [], T, max(T // 2, 1)
        while left > 0:
            take = min(n, left)
            pos.extend(range(take))
            left -= take
            n = max(n // 2, 1)
        rows.append(torch.tensor(pos))
    return torch.stack(rows).to(device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    dev = torch.device(args.device)
    B, H, T, D, dt = args.batch, args.heads, args.seq_len, args.head_dim, args.dtype
    g = torch.Generator(device=dev).manual_seed(0)
    dp = doc_pos_for(B, T, dev)
    rows: list[tuple[str, str, float, float]] = []

    # gated key extractor, Eq. 8
    kt = torch.randn(B, H, T, D, device=dev, generator=g).to(dt).requires_grad_()
    lg = torch.randn(B, H, T, device=dev, generator=g).to(dt).requires_grad_()
    ld = torch.rand(B, H, T, device=dev, generator=g).to(dt).requires_grad_()
    leaves = [kt, lg, ld]
    t_chunk = time_fwd_bwd(
        lambda: gated_keys_chunked(kt, lg, ld, dp, args.chunk), leaves, args.repeats, dev
    )
    t_naive = float("nan")
    if not args.skip_naive_scan:
        t_naive = time_fwd_bwd(
            lambda: gated_keys_naive(kt, lg, ld, dp), leaves, max(1, args.repeats // 2), dev
        )
    rows.append(("key scan (Eq. 8)", f"chunked C={args.chunk} vs naive", t_naive, t_chunk))

    # memory reads, Eq. 4 / Eq. 10
    q = (torch.randn(B, H, T, D, device=dev, generator=g) * 8).to(dt).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, device=dev, generator=g), dim=-1)
    k = k.to(dt).requires_grad_()
    v = torch.randn(B, H, T, D, device=dev, generator=g).to(dt).requires_grad_()
    leaves = [q, k, v]
    memories = {
        f"STM h={args.stm_window}": (1, args.stm_window - 1),
        f"LTM m={args.ltm_offset}": (args.ltm_offset, None),
    }
    backends = ["flex"] if HAS_FLEX else []
    for name, lags in memories.items():
        t_dense = time_fwd_bwd(
            lambda lags=lags: memory_attention(q, k, v, dp, *lags, backend="dense"),
            leaves,
            args.repeats,
            dev,
        )
        for backend in backends:
            t_fast = time_fwd_bwd(
                lambda lags=lags, b=backend: memory_attention(q, k, v, dp, *lags, backend=b),
                leaves,
                args.repeats,
                dev,
            )
            rows.append((f"memory {name}", f"{backend} vs dense", t_dense, t_fast))

    print(
        f"device={dev} dtype={str(dt).removeprefix('torch.')} B={B} H={H} T={T} D={D} "
        f"(forward+backward, median of {args.repeats}; torch {torch.__version__})"
    )
    header = f"{'op':<22} {'comparison':<24} {'reference ms':>13} {'fast ms':>10} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for op, comp, t_ref, t_fast in rows:
        print(
            f"{op:<22} {comp:<24} {t_ref * 1e3:>13.2f} {t_fast * 1e3:>10.2f} "
            f"{t_ref / t_fast:>8.2f}x"
        )


if __name__ == "__main__":
    main()
