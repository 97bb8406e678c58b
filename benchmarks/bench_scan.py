"""Time the gated key scan of Eq. 8: fused Triton kernels vs the chunked torch scan.

For each sequence length, forward and forward+backward times of both backends, and the
achieved bandwidth: the bytes the op must move at least (read k̃, W_g x, |W_λ x|, the resets
and write the keys; backward also reads the keys' gradient and writes three input gradients;
plus the Triton checkpoints), divided by the time, as a fraction of ``--peak-gbps`` (H100 SXM
~3350 GB/s, H200 ~4800 GB/s). The target for the fused scan is >= 70% of peak on H100/H200.

Real numbers need a GPU. On CPU the Triton kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1``), thousands of times slower: a CPU run is a smoke test of the script,
its figures mean nothing.

    python benchmarks/bench_scan.py --peak-gbps 4800              # CUDA: T = 4096 and 32768
    TRITON_INTERPRET=1 python benchmarks/bench_scan.py --device cpu --seq-lens 64 \\
        --heads 2 --head-dim 8 --repeats 1                        # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from mm_megatron.ops.key_scan import gated_key_scan, triton_unavailable_reason


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--chunk", type=int, default=64, help="chunk size of the torch scan")
    p.add_argument("--block-t", type=int, default=None, help="tile of the Triton scan")
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="HBM peak, GB/s")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--backends", nargs="+", default=["triton", "torch"])
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scan_forward(inputs: tuple, reset: torch.Tensor, backend: str, kw: dict) -> object:
    with torch.no_grad():
        return gated_key_scan(*inputs, reset, backend=backend, **kw)


def scan_forward_backward(
    inputs: tuple, reset: torch.Tensor, up: torch.Tensor, backend: str, kw: dict
) -> object:
    leaves = [x.detach().requires_grad_() for x in inputs]
    keys, _ = gated_key_scan(*leaves, reset, backend=backend, **kw)
    return torch.autograd.grad(keys, leaves, up)


def min_bytes(B: int, H: int, T: int, D: int, elem: int, backward: bool, ckpt: int) -> int:
    """Bytes the scan must move (see the module docstring); ``ckpt``: Triton's tile or 0."""
    keys = B * H * T * D * elem
    scalars = B * H * T * elem * 2 + B * T  # W_g x, |W_λ x|, resets
    ck = (B * H * (-(-T // ckpt)) * (D + 1) * 4) if ckpt else 0
    fwd = 2 * keys + scalars + ck
    if not backward:
        return fwd
    # backward: read k̃, dk, scalars, checkpoints; write dk̃ and two scalar gradients
    return fwd + 3 * keys + scalars + B * H * T * elem * 2 + ck


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8
    B, H, D = args.batch, args.heads, args.head_dim
    reason = triton_unavailable_reason(device)
    if device.type == "cpu":
        print("CPU run: a smoke test only; real numbers need a GPU.")
    print(f"B={B} H={H} D={D} {args.dtype} peak={args.peak_gbps:.0f} GB/s on {device}")
    cols = ("T", "backend", "fwd ms", "fwd %peak", "f+b ms", "f+b %peak")
    print(" ".join(f"{c:>{ {'T': 6, 'backend': 7}.get(c, 9) }}" for c in cols))
    for T in args.seq_lens:
        g = torch.Generator(device=device).manual_seed(0)
        kt = torch.randn(B, H, T, D, device=device, generator=g).to(dtype)
        lg = (torch.randn(B, H, T, device=device, generator=g) * 2).to(dtype)
        ld = torch.rand(B, H, T, device=device, generator=g).to(dtype)
        reset = torch.zeros(B, T, dtype=torch.bool, device=device)
        reset[:, 0] = True
        reset[:, T // 3] = True
        up = torch.randn(B, H, T, D, device=device).to(dtype)
        for backend in args.backends:
            if backend == "triton" and reason is not None:
                print(f"{T:>6} {backend:>7}  skipped: {reason}")
                continue
            kw = {"block_t": args.block_t} if backend == "triton" else {"chunk_size": args.chunk}
            fwd = functools.partial(scan_forward, (kt, lg, ld), reset, backend, kw)
            fwd_bwd = functools.partial(scan_forward_backward, (kt, lg, ld), reset, up, backend, kw)
            t_f = timed(fwd, device, args.repeats)
            t_fb = timed(fwd_bwd, device, args.repeats)
            tile = (args.block_t or 32) if backend == "triton" else 0
            bw_f = min_bytes(B, H, T, D, elem, False, tile) / t_f / 1e9
            bw_fb = min_bytes(B, H, T, D, elem, True, tile) / t_fb / 1e9
            print(
                f"{T:>6} {backend:>7} {t_f * 1e3:>9.3f} {100 * bw_f / args.peak_gbps:>8.1f}% "
                f"{t_fb * 1e3:>9.3f} {100 * bw_fb / args.peak_gbps:>8.1f}%"
            )


if __name__ == "__main__":
    main()
