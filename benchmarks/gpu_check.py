"""One-command check of the MM v2 GPU hot path: correctness, speed against attention, a
training step against the transformer, recompiles. Prints one table of ratios.

    python benchmarks/gpu_check.py            # on a GPU (H100/H200): about 5-10 minutes
    python benchmarks/gpu_check.py --smoke    # tiny shapes, runs on CPU in about a minute
    python benchmarks/gpu_check.py --parts scan_bw,memories --json out.json

Each part runs in its own process with its own timeout (a crash or a hang costs that part
only), and all of them within ``--budget`` seconds. Parts:

* ``tests``: the GPU test tier (``pytest -m gpu tests/gpu``).
* ``accuracy``: chunked key scan and memory reads against the references, bf16 inputs
  (relative error of outputs and gradients; the references accumulate in fp32/fp64).
* ``scan_bw``: key scan forward bandwidth as a fraction of the device's HBM peak (the
  Triton scan from ``mm_megatron.ops.triton_scan`` too when it is importable).
* ``memories``: STM and LTM read (forward + backward) time over causal SDPA (flash) at the
  same shapes, T = 4096 and 32768, 8B width (32 heads of 128).
* ``step``: a 2-layer 8B-width MM v2 training step and the transformer's, through the real
  training path: tokens/s ratio, MFU with the MM FLOP count, peak memory.
* ``recompile``: torch.compile graph count while the LTM offset m takes new values after
  warm-up (target: zero new graphs).

Targets (H100/H200, bf16): step tokens/s >= 0.9x the transformer's, MFU >= 40%, STM time
<= 0.15x causal attention at 4k, scan >= 70% of HBM bandwidth, zero recompiles. The status
column says PASS/FAIL against a target, INFO where there is none (or on CPU), SKIP and
ERROR where a part could not run.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("tests", "accuracy", "scan_bw", "memories", "step", "recompile")
TIMEOUT_S = {
    "tests": 150,
    "accuracy": 60,
    "scan_bw": 45,
    "memories": 100,
    "step": 110,
    "recompile": 45,
}
HBM_PEAK = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.04e12,
    "A100": 1.56e12,
}  # bytes/s, by device-name substring (first match)
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}

Row = dict[str, Any]


def row(check: str, value: Any, target: str = "", ok: bool | None = None, note: str = "") -> Row:
    """One table row; ``ok`` None means informative (no target, or not comparable here)."""
    status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    return {"check": check, "value": value, "target": target, "status": status, "note": note}


# --------------------------------------------------------------------------- helpers


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _by_name(table: dict[str, float]) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in table.items() if k in name), None)


def _time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` (synchronised on CUDA)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _rel(a: Any, b: Any) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _doc_pos(batch: int, seq: int, device: Any) -> Any:
    """Row 0 one document; other rows several (lengths 1, 50, seq/4, rest)."""
    import torch

    rows = [torch.arange(seq)]
    for _ in range(batch - 1):
        cuts = [1, min(50, seq // 4), seq // 4]
        parts = [torch.arange(n) for n in cuts] + [torch.arange(seq - sum(cuts))]
        rows.append(torch.cat(parts))
    return torch.stack(rows).to(device)


def triton_scan() -> Callable | None:
    """The fused Triton key scan as ``(k̃, log g, log λ, doc_pos) -> keys``, or None where it
    cannot run (no triton, no CUDA)."""
    from mm_megatron.ops.key_scan import gated_key_scan, triton_unavailable_reason

    if triton_unavailable_reason(_device()) is not None:
        return None

    def scan(k_tilde: Any, log_gate: Any, log_decay: Any, doc_pos: Any) -> Any:
        reset = doc_pos == 0
        return gated_key_scan(k_tilde, log_gate, log_decay, reset, backend="triton")[0]

    return scan


# --------------------------------------------------------------------------- parts


def part_tests(smoke: bool) -> list[Row]:
    if smoke:
        return [row("GPU test tier", "skipped", note="--smoke")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return [row("GPU test tier (pytest -m gpu)", tail, "all pass", result.returncode == 0)]


def part_accuracy(smoke: bool) -> list[Row]:
    import torch

    from mm_megatron.ops import (
        gated_keys_chunked,
        gated_keys_naive,
        memory_attention,
        memory_attention_dense,
    )

    dev = _device()
    B, H, T, D = (2, 2, 96, 16) if smoke else (2, 4, 4096, 128)
    g = torch.Generator(device=dev).manual_seed(0)
    dp = _doc_pos(B, T, dev)
    rows = []
    kt = torch.randn(B, H, T, D, device=dev, generator=g)
    lg = torch.randn(B, H, T, device=dev, generator=g)
    ld = torch.rand(B, H, T, device=dev, generator=g)
    leaves = [x.bfloat16().requires_grad_() for x in (kt, lg, ld)]
    up = torch.randn(B, H, T, D, device=dev, generator=g)
    out = gated_keys_chunked(*leaves, dp)
    grads = torch.autograd.grad((out.float() * up).sum(), leaves)
    ref_in = [x.detach().float().requires_grad_() for x in leaves]
    ref = gated_keys_naive(*ref_in, dp)
    ref_grads = torch.autograd.grad((ref * up).sum(), ref_in)
    err = max([_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_grads, strict=True)])
    rows.append(row("scan bf16 vs reference (rel err)", f"{err:.2e}", "<= 2e-2", err <= 2e-2))
    scan = triton_scan()
    if scan is None:
        rows.append(row("Triton scan bf16 vs reference", "not available"))
    else:
        fused = scan(*[x.detach() for x in leaves], dp)
        e = _rel(fused, ref)
        rows.append(row("Triton scan bf16 vs reference", f"{e:.2e}", "<= 2e-2", e <= 2e-2))
    for kind, lags in (
        ("STM", (1, 255 if not smoke else 15)),
        ("LTM", (64 if not smoke else 8, None)),
    ):
        q = (torch.randn(B, H, T, D, device=dev, generator=g) * 8).bfloat16().requires_grad_()
        k = torch.nn.functional.normalize(torch.randn(B, H, T, D, device=dev, generator=g), dim=-1)
        k = k.bfloat16().requires_grad_()
        v = torch.randn(B, H, T, D, device=dev, generator=g).bfloat16().requires_grad_()
        o = memory_attention(q, k, v, dp, *lags, backend="auto")
        gr = torch.autograd.grad((o.float() * up).sum(), (q, k, v))
        r = memory_attention_dense(q, k, v, dp, *lags)
        rg = torch.autograd.grad((r.float() * up).sum(), (q, k, v))
        e = max([_rel(o, r)] + [_rel(a, b) for a, b in zip(gr, rg, strict=True)])
        rows.append(row(f"{kind} read bf16 vs dense (rel err)", f"{e:.2e}", "<= 3e-2", e <= 3e-2))
    return rows


def part_scan_bw(smoke: bool) -> list[Row]:
    import torch

    from mm_megatron.ops import gated_keys_chunked

    dev = _device()
    B, H, T, D = (1, 2, 256, 16) if smoke else (1, 32, 4096, 128)
    dt = torch.bfloat16
    kt = torch.randn(B, H, T, D, device=dev, dtype=dt)
    lg, ld = torch.randn(B, H, T, device=dev, dtype=dt), torch.rand(B, H, T, device=dev, dtype=dt)
    dp = _doc_pos(B, T, dev)
    moved = 2 * kt.numel() * kt.element_size() + 2 * lg.numel() * lg.element_size()
    moved += dp.numel() * dp.element_size()
    peak = _by_name(HBM_PEAK)
    rows = []
    scans = [("chunked scan", lambda: gated_keys_chunked(kt, lg, ld, dp))]
    fused = triton_scan()
    if fused is None:
        rows.append(row("Triton scan bandwidth / HBM peak", "not available", ">= 0.70"))
    else:
        scans.append(("Triton scan", lambda: fused(kt, lg, ld, dp)))
    with torch.no_grad():
        for name, fn in scans:
            t = _time(fn, 5 if smoke else 20)
            gbs = moved / t / 1e9
            if peak is None:
                rows.append(row(f"{name} bandwidth", f"{gbs:.2f} GB/s", note="no HBM peak known"))
            else:
                frac = moved / t / peak
                target = ">= 0.70" if name == "Triton scan" else ""
                ok = frac >= 0.70 if target else None
                rows.append(
                    row(
                        f"{name} bandwidth / HBM peak", f"{frac:.2f}", target, ok, f"{gbs:.0f} GB/s"
                    )
                )
    return rows


def _memory_read(q: Any, k: Any, v: Any, doc_pos: Any, lags: tuple) -> Any:
    from mm_megatron.ops import memory_attention

    return memory_attention(q, k, v, doc_pos, *lags)


def _fwd_bwd_time(fn: Callable[..., Any], inputs: tuple, up: Any, repeats: int) -> float:
    """Median seconds of forward + backward of ``fn(*inputs)`` against the cotangent ``up``."""
    import torch

    return _time(lambda: torch.autograd.grad((fn(*inputs) * up).sum(), inputs), repeats)


def part_memories(smoke: bool) -> list[Row]:
    import torch
    import torch.nn.functional as F

    dev = _device()
    H, D = (2, 16) if smoke else (32, 128)
    lengths = (128, 512) if smoke else (4096, 32768)
    h, m = (32, 16) if smoke else (256, 64)
    rows = []
    repeats = 3 if smoke else 10
    for T in lengths:
        shape = (1, H, T, D)
        q, k, v = (
            torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        dp = _doc_pos(1, T, dev)
        up = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        t_attn = _fwd_bwd_time(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            (q, k, v),
            up,
            repeats,
        )
        for kind, lags, target in (("STM", (1, h - 1), 0.15), ("LTM", (m, None), None)):
            read = functools.partial(_memory_read, doc_pos=dp, lags=lags)
            t = _fwd_bwd_time(read, (q, k, v), up, repeats)
            use_target = target is not None and T == lengths[0] and dev.type == "cuda"
            rows.append(
                row(
                    f"{kind} / causal SDPA time, T={T}",
                    f"{t / t_attn:.3f}",
                    f"<= {target}" if use_target else "",
                    (t / t_attn <= target) if use_target else None,
                    f"{1e3 * t:.2f} vs {1e3 * t_attn:.2f} ms",
                )
            )
    return rows


def part_step(smoke: bool, arch: str) -> list[Row]:
    """One model's training step through the real training path (data, DDP, optimizer)."""
    import dataclasses

    import torch

    from mm_megatron.flops import training_flops_per_token
    from mm_megatron.model import init_model_parallel
    from pretrain.components import Components
    from pretrain.config import load_train_config
    from pretrain.data import BatchStream, TokenizerView, build_datasets
    from pretrain.distributed import init_distributed
    from pretrain.steps import train_step

    config_file = "pretrain/configs/tiny_mm.yaml" if smoke else "pretrain/configs/mm_8b.yaml"
    single = [
        "parallel.tensor_model_parallel_size=1",
        "parallel.sequence_parallel=false",
        "parallel.use_distributed_optimizer=false",
        "parallel.overlap_grad_reduce=false",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        "train.iters=100",
        "optimizer.warmup_iters=1",
        "model.num_layers=2",
        "data.mock=true",
        "checkpoint.dir=null",
        "logging.dir=null",
    ]
    if smoke:
        single += ["model.seq_length=64", "model.vocab_size=512"]
    cfg = load_train_config(str(ROOT / config_file), single)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=arch))
    _, device = init_distributed()
    init_model_parallel(cfg.parallel, cfg.train.seed)
    parts = Components.build(cfg, device, log=False)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    tok = TokenizerView(vocab_size=cfg.model.vocab_size, eod=cfg.model.vocab_size - 1)
    warm, steps = (1, 2) if smoke else (3, 8)
    train_ds, _, _ = build_datasets(cfg, tok, [warm + steps + 1, 0, 0])
    stream = [BatchStream(train_ds, 1, 0, 1, 0, device)]
    counter = iter(range(1, 10**6))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = _time(
        lambda: train_step(cfg, model, optimizer, scheduler, stream, 1, next(counter)),
        steps,
        warmup=warm,
    )
    tokens_s = cfg.model.seq_length / t
    flops = training_flops_per_token(cfg.model)
    peak = _by_name(BF16_PEAK)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return [
        {
            "arch": arch,
            "tokens_s": tokens_s,
            "mfu": tokens_s * flops / peak if peak else None,
            "mem_gib": mem,
        }
    ]


def part_recompile(smoke: bool) -> list[Row]:
    import torch
    from torch._dynamo.utils import counters

    from mm_megatron.ops import memory_attention

    module = importlib.import_module("mm_megatron.ops.memory_attention")
    probe = getattr(module, "recompile_probe", None)
    if probe is not None:  # the memories' own probe, when that module provides one
        return [row("recompiles after warm-up (module probe)", probe(), "0", probe() == 0)]
    dev = _device()
    H, T, D = (2, 128, 16) if smoke else (32, 4096, 128)
    q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    dp = _doc_pos(1, T, dev)
    offsets = (4, 8, 12, 16) if smoke else (64, 100, 163, 200, 256)

    def graphs() -> int:
        return sum(counters["stats"].values()) if "stats" in counters else 0

    with torch.no_grad():
        memory_attention(q, k, v, dp, offsets[0], None)  # warm-up
        memory_attention(q, k, v, dp, 1, 255 if not smoke else 15)
        before = graphs()
        for m in offsets[1:]:
            memory_attention(q, k, v, dp, m, None)
        new = graphs() - before
    note = f"m in {offsets[1:]}" + ("" if dev.type == "cuda" else "; CPU runs eager flex")
    return [
        row("recompiles after warm-up", new, "0", new == 0 if dev.type == "cuda" else None, note)
    ]


# --------------------------------------------------------------------------- driver


def run_part(name: str, smoke: bool, arch: str | None) -> list[Row]:
    if name == "step":
        return part_step(smoke, arch or "mm")
    return globals()[f"part_{name}"](smoke)


def _spawn(name: str, smoke: bool, timeout: float, arch: str | None = None) -> list[Row]:
    """Run one part in a child process; its rows, or one SKIP/ERROR row."""
    label = name if arch is None else f"{name} ({arch})"
    if timeout < 5:
        return [{**row(label, "skipped", note="out of time budget"), "status": "SKIP"}]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, "--part", name, "--out", str(out)]
        cmd += ["--smoke"] if smoke else []
        cmd += ["--arch", arch] if arch else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
            )
        except subprocess.TimeoutExpired:
            return [{**row(label, f"timed out after {timeout:.0f} s"), "status": "ERROR"}]
        if result.returncode != 0 or not out.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1][:90]
            return [{**row(label, "failed", note=last), "status": "ERROR"}]
        return json.loads(out.read_text())


def _step_rows(results: dict[str, list[Row]]) -> list[Row]:
    """Combine the two step parts into the ratio rows."""
    mm, tr = results.get("mm", []), results.get("transformer", [])
    if not (mm and "tokens_s" in mm[0] and tr and "tokens_s" in tr[0]):
        return [r for r in mm + tr if "check" in r]
    mm, tr = mm[0], tr[0]
    gpu = mm["mfu"] is not None
    ratio = mm["tokens_s"] / tr["tokens_s"]
    rows = [
        row(
            "2-layer step: MM / transformer tokens/s",
            f"{ratio:.2f}",
            ">= 0.90" if gpu else "",
            ratio >= 0.9 if gpu else None,
            f"{mm['tokens_s']:,.0f} vs {tr['tokens_s']:,.0f} tok/s",
        )
    ]
    if gpu:
        rows.append(
            row(
                "MM step MFU (MM FLOP count)",
                f"{100 * mm['mfu']:.1f}%",
                ">= 40%",
                mm["mfu"] >= 0.40,
                f"transformer {100 * tr['mfu']:.1f}%",
            )
        )
        rows.append(
            row(
                "peak memory MM / transformer",
                f"{mm['mem_gib'] / tr['mem_gib']:.2f}",
                note=f"{mm['mem_gib']:.1f} vs {tr['mem_gib']:.1f} GiB",
            )
        )
    return rows


def print_table(rows: list[Row], header: str) -> None:
    names = ("check", "value", "target")
    widths = [max([len(c)] + [len(str(r[c])) for r in rows]) for c in names]
    print(header)
    print(f"{'check':<{widths[0]}}  {'value':>{widths[1]}}  {'target':<{widths[2]}}  status  note")
    for r in rows:
        print(
            f"{r['check']:<{widths[0]}}  {str(r['value']):>{widths[1]}}  "
            f"{r['target']:<{widths[2]}}  {r['status']:<6}  {r['note']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU self-test)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for all parts")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # child process: one part
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.part:
        Path(args.out).write_text(json.dumps(run_part(args.part, args.smoke, args.arch)))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    start = time.monotonic()
    rows: list[Row] = []
    for name in parts:
        remaining = args.budget - (time.monotonic() - start)
        if name == "step":
            results = {}
            for arch in ("mm", "transformer"):
                left = args.budget - (time.monotonic() - start)
                results[arch] = _spawn(name, args.smoke, min(TIMEOUT_S[name], left), arch)
            rows += _step_rows(results)
        else:
            rows += _spawn(name, args.smoke, min(TIMEOUT_S[name], remaining))
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)"
    te = importlib.util.find_spec("transformer_engine") is not None
    header = (
        f"MM v2 GPU check on {where}, torch {torch.__version__}, "
        f"TE {'present' if te else 'absent'}{', smoke shapes' if args.smoke else ''}, "
        f"{time.monotonic() - start:.0f} s"
    )
    print_table(rows, header)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["status"] == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
