"""Small-scale replication of the paper's length-extrapolation claim on 2 CPU cores.

"Memory Mosaics at scale" (arXiv 2507.03285, §5.2, Table 3) trains at 4k and evaluates at
32k: the transformer degrades past its training length, MM v2 does not. Here, at toy scale:

1. train the tiny MM v2 (``pretrain/configs/tiny_mm.yaml``) and a tiny transformer with the
   same parameter count (``tiny_transformer.yaml`` with a wider FFN) on the embedded corpus
   (the Python standard library) at context 256, through the real training program
   (``pretrain/pretrain_mm.py``, both at once, one core each);
2. export both to Hugging Face (``tools/convert_checkpoint.py``: MM v2 remote code, and the
   baseline as Llama, whose RoPE is simply extrapolated past 256);
3. evaluate the validation loss by position up to 2048 (8x the training length) for MM v2,
   MM v2 without long-term memory (Tables 2, 9, 10) and the transformer, the loss at several
   inference m (MM v2), and multi-query associative recall (Zoology) at 256..2048 tokens;
4. write ``results.json``, ``table.md`` and ``extrapolation.png`` (needs matplotlib).

    python benchmarks/replicate_extrapolation.py                 # the full run
    python benchmarks/replicate_extrapolation.py --quick         # a few-minute smoke version
    python benchmarks/replicate_extrapolation.py --plot-only     # redraw from results.json

Resumable: a finished step is skipped (training resumes from its last checkpoint, an
existing export is reused, evaluation results are cached in ``<out>/eval_*.json``). Progress
is printed as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mm_megatron.checkpoint.format import TRACKER

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "mm": ROOT / "pretrain/configs/tiny_mm.yaml",
    "transformer": ROOT / "pretrain/configs/tiny_transformer.yaml",
}
# tiny_transformer.yaml has 1.853M parameters against tiny_mm.yaml's 1.992M: a wider FFN
# (352 -> 440) brings it to 1.988M (0.2% fewer), the "equal parameters" baseline.
TRANSFORMER_FFN = 440
VALID = "data/demo/demo_valid_text_document"
LABELS = {"mm": "MM v2", "mm_no_ltm": "MM v2 without LTM", "transformer": "transformer (RoPE)"}
T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/extrapolation", help="working directory")
    p.add_argument(
        "--results",
        default="benchmarks/results",
        help="where the plot, table and results.json are copied",
    )
    p.add_argument("--iters", type=int, default=600, help="training iterations per model")
    p.add_argument("--eval-length", type=int, default=2048, help="longest evaluated length")
    p.add_argument(
        "--sequences",
        type=int,
        default=17,
        help="validation documents for the loss by position (17 hold 2049 tokens)",
    )
    p.add_argument("--bucket", type=int, default=128, help="positions per bucket")
    p.add_argument("--mqar-examples", type=int, default=16, help="MQAR sequences per length")
    p.add_argument("--offsets", default="16,32,64", help="inference m of the MM v2 sweep")
    p.add_argument(
        "--sweep-sequences",
        type=int,
        default=8,
        help="validation documents of the m sweep (at the longest length)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke version: 30 iterations, 2 documents, 4 MQAR examples",
    )
    p.add_argument("--plot-only", action="store_true", help="redraw from <out>/results.json")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.sequences, args.mqar_examples, args.sweep_sequences = 30, 2, 4, 2
        if args.out == "runs/extrapolation":
            args.out = "runs/extrapolation_quick"
        if args.results == "benchmarks/results":
            args.results = str(Path(args.out) / "results")
    for name in ("iters", "sequences", "bucket", "mqar_examples", "sweep_sequences"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_length < 256 or args.eval_length % args.bucket:
        p.error("--eval-length must be >= 256 (the training length) and a multiple of --bucket")
    try:
        args.offsets = [int(m) for m in args.offsets.split(",")]
    except ValueError:
        p.error(f"--offsets: expected comma-separated integers, got {args.offsets!r}")
    args.out, args.results = ROOT / args.out, ROOT / args.results
    return args


# --------------------------------------------------------------------------- parameters


def overrides(arch: str, args: argparse.Namespace) -> list[str]:
    """Config overrides of one training run (into ``<out>/<arch>``)."""
    run = args.out / arch
    items = [
        f"train.iters={args.iters}",
        f"optimizer.warmup_iters={max(1, args.iters // 20)}",
        f"checkpoint.dir={run / 'checkpoints'}",
        f"logging.dir={run / 'logs'}",
        f"checkpoint.interval={max(1, args.iters // 4)}",
        "checkpoint.keep_last=1",
        f"logging.interval={max(1, args.iters // 20)}",
        "logging.eval_interval=null",
        f"logging.position_loss_interval={max(1, args.iters // 4)}",
        "logging.position_loss_length=1024",
        "logging.position_loss_sequences=2",
    ]
    if arch == "transformer":
        items.append(f"model.ffn_hidden_size={TRANSFORMER_FFN}")
    return items


def parameter_counts(args: argparse.Namespace) -> dict[str, int]:
    from mm_megatron.config import load_model_config
    from mm_megatron.flops import count_params

    counts = {}
    for arch, path in CONFIGS.items():
        model_overrides = [o for o in overrides(arch, args) if o.startswith("model.")]
        counts[arch] = count_params(load_model_config(str(path), model_overrides)).total
    return counts


# --------------------------------------------------------------------------- training


def finished(run: Path, iters: int) -> bool:
    tracker = run / "checkpoints" / TRACKER
    return tracker.is_file() and tracker.read_text().strip() == str(iters)


def _pump(proc: subprocess.Popen, tag: str, sink: list[str]) -> None:
    for line in proc.stdout:
        sink.append(line)
        if line.startswith(("step ", "position loss", "training finished", "resuming", "error")):
            log(f"{tag}: {line.rstrip()}")


def train(args: argparse.Namespace) -> dict[str, float]:
    """Train both models at once (one process and one thread each); returns their CPU
    seconds. Each run resumes from its own checkpoints when interrupted."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
    }
    procs = {}
    for arch, config in CONFIGS.items():
        if finished(args.out / arch, args.iters):
            log(f"{arch}: already trained for {args.iters} iterations")
            continue
        cmd = [
            sys.executable,
            str(ROOT / "pretrain/pretrain_mm.py"),
            "--config",
            str(config),
            *overrides(arch, args),
        ]
        log(f"{arch}: training ({' '.join(cmd[2:])})")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        lines: list[str] = []
        thread = threading.Thread(target=_pump, args=(proc, arch, lines), daemon=True)
        thread.start()
        procs[arch] = (proc, thread, lines)
    for arch, (proc, thread, lines) in procs.items():
        proc.wait()
        thread.join()
        if proc.returncode != 0:
            sys.exit(
                f"{arch}: training failed (status {proc.returncode}):\n" + "".join(lines[-30:])
            )
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": usage.ru_utime + usage.ru_stime}


def export(args: argparse.Namespace) -> None:
    for arch in CONFIGS:
        out = args.out / arch / "hf"
        if (out / "config.json").is_file():
            log(f"{arch}: export exists ({out})")
            continue
        cmd = [
            sys.executable,
            str(ROOT / "tools/convert_checkpoint.py"),
            "--to",
            "hf",
            "--load",
            str(args.out / arch / "checkpoints"),
            "--save",
            str(out),
        ]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if result.returncode != 0:
            sys.exit(f"{arch}: export failed:\n{result.stderr[-3000:]}")
        log(f"{arch}: exported: " + result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- evaluation


def cached(path: Path, compute: Any) -> Any:
    if path.is_file():
        log(f"reusing {path.name}")
        return json.loads(path.read_text())
    t = time.monotonic()
    value = compute()
    path.write_text(json.dumps(value, indent=1) + "\n")
    log(f"wrote {path.name} ({time.monotonic() - t:.0f} s)")
    return value


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch

    from mm_megatron.eval.extrapolation_cli import default_token_range
    from mm_megatron.eval.ltm_ablation import apply_ltm_removal, run_ltm_sweep
    from mm_megatron.eval.model_source import load_model
    from mm_megatron.eval.mqar import run_mqar
    from mm_megatron.eval.position_loss import run_position_loss

    torch.set_num_threads(2)
    loaded = {arch: load_model(args.out / arch / "hf") for arch in CONFIGS}
    models = {"mm": loaded["mm"].model, "transformer": loaded["transformer"].model}
    models["mm_no_ltm"] = apply_ltm_removal(copy.deepcopy(models["mm"]))
    config = models["mm"].config
    token_range = default_token_range(config.vocab_size, [config.bos_token_id, config.eos_token_id])
    lengths = [n for n in (256, 512, 1024, 2048, 4096) if n <= args.eval_length]
    out: dict[str, Any] = {"position_loss": {}, "mqar": {}}
    for name, model in models.items():
        log(f"{name}: loss by position up to {args.eval_length}")
        out["position_loss"][name] = cached(
            args.out / f"eval_position_{name}.json",
            lambda m=model: run_position_loss(
                m,
                str(ROOT / VALID),
                length=args.eval_length,
                num_sequences=args.sequences,
                bucket_size=args.bucket,
                train_length=256,
            ),
        )
        log(f"{name}: MQAR at {lengths}")
        out["mqar"][name] = cached(
            args.out / f"eval_mqar_{name}.json",
            lambda m=model: run_mqar(
                m,
                lengths,
                token_range=token_range,
                num_examples=args.mqar_examples,
                bos_id=config.bos_token_id,
                batch_size=4,
            ),
        )
    log(f"mm: inference m sweep {args.offsets} at {args.eval_length}")
    out["ltm_sweep"] = cached(
        args.out / "eval_ltm_sweep.json",
        lambda: {
            str(args.eval_length): run_ltm_sweep(
                models["mm"],
                str(ROOT / VALID),
                args.offsets,
                length=args.eval_length,
                num_sequences=args.sweep_sequences,
                bucket_size=args.bucket,
            )
        },
    )
    out["token_range"] = list(token_range)
    return out


# --------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    pl, mq = results["position_loss"], results["mqar"]
    names = [n for n in ("mm", "mm_no_ltm", "transformer") if n in pl]
    counts = results["parameters"]
    lines = [
        f"Parameters: MM v2 {counts['mm']:,}, transformer {counts['transformer']:,} "
        f"({100 * (counts['transformer'] / counts['mm'] - 1):+.1f}%); trained "
        f"{results['iters']} iterations of 8 x 256 tokens each.",
        "",
        "Validation loss (nats/token) by position; training length 256:",
        "",
        "| positions | " + " | ".join(LABELS[n] for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    buckets = pl[names[0]]["buckets"]
    for i, b in enumerate(buckets):
        lines.append(
            f"| {b['start']}-{b['end'] - 1} | "
            + " | ".join(f"{pl[n]['buckets'][i]['loss']:.3f}" for n in names)
            + " |"
        )
    lines.append(
        "| **0-255 (mean)** | "
        + " | ".join(f"{pl[n]['loss_within_train_length']:.3f}" for n in names)
        + " |"
    )
    lines.append(
        f"| **256-{buckets[-1]['end'] - 1} (mean)** | "
        + " | ".join(f"{pl[n]['loss_beyond_train_length']:.3f}" for n in names)
        + " |"
    )
    lines += [
        "",
        "Multi-query associative recall (zero-shot; accuracy on the answer tokens, "
        "answer loss in nats):",
        "",
        "| length | pairs | " + " | ".join(f"{LABELS[n]} acc / loss" for n in names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for i, r in enumerate(mq[names[0]]["results"]):
        lines.append(
            f"| {r['length']} | {r['kv_pairs']} | "
            + " | ".join(
                f"{mq[n]['results'][i]['accuracy']:.3f} / {mq[n]['results'][i]['loss']:.2f}"
                for n in names
            )
            + " |"
        )
    sweep = results.get("ltm_sweep", {})
    if sweep:
        lengths = list(sweep)
        lines += [
            "",
            "MM v2 mean loss at inference m (trained with m ~ U[16, 64], m = 16 at inference):",
            "",
            "| m | " + " | ".join(f"length {n}" for n in lengths) + " |",
            "|---:|" + "---:|" * len(lengths),
        ]
        for i, r in enumerate(sweep[lengths[0]]["results"]):
            lines.append(
                f"| {r['ltm_offset']} | "
                + " | ".join(f"{sweep[n]['results'][i]['loss']:.3f}" for n in lengths)
                + " |"
            )
    if "timing" in results:
        t = results["timing"]
        lines += [
            "",
            f"Wall time {t['wall_s'] / 60:.1f} min (training {t['train_wall_s'] / 60:.1f}"
            f" min, both models at once); CPU time {t['cpu_s'] / 60:.1f} min.",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit(
            "the plot needs the 'matplotlib' package (pip install matplotlib); the table "
            "and results.json are written; rerun with --plot-only once it is installed"
        )
    pl, mq = results["position_loss"], results["mqar"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, style in (("mm", "-o"), ("mm_no_ltm", "--s"), ("transformer", "-^")):
        if name not in pl:
            continue
        b = pl[name]["buckets"]
        axes[0].plot(
            [(x["start"] + x["end"]) / 2 for x in b],
            [x["loss"] for x in b],
            style,
            ms=3,
            label=LABELS[name],
        )
        r = mq[name]["results"]
        for ax, key in ((axes[1], "accuracy"), (axes[2], "loss")):
            ax.plot([x["length"] for x in r], [x[key] for x in r], style, ms=4, label=LABELS[name])
    for ax in axes:
        ax.axvline(256, color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].set(
        xlabel="position in document",
        ylabel="validation loss (nats/token)",
        title="loss by position (trained at 256)",
    )
    axes[1].set(ylabel="accuracy on answer tokens", title="MQAR accuracy (zero-shot)")
    axes[2].set(ylabel="loss on answer tokens (nats)", title="MQAR answer loss")
    ticks = [x["length"] for x in mq["mm"]["results"]]
    for ax in axes[1:]:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("sequence length")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    if not args.plot_only:
        counts = parameter_counts(args)
        log(f"parameters: MM v2 {counts['mm']:,}, transformer {counts['transformer']:,}")
        if not (ROOT / f"{VALID}.idx").is_file():
            sys.exit("the demo data is missing: run scripts/prepare_demo_data.sh first")
        t = time.monotonic()
        usage = train(args)
        train_wall = time.monotonic() - t
        export(args)
        results = {"iters": args.iters, "parameters": counts, **evaluate(args)}
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        results["timing"] = {
            "wall_s": time.monotonic() - T0,
            "train_wall_s": train_wall,
            "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "train_cpu_s": usage["cpu_s"],
        }
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    results = json.loads(results_file.read_text())
    text = table(results)
    print(text)
    (args.out / "table.md").write_text(text)
    (args.results / "extrapolation.md").write_text(text)
    summary = {
        k: results[k] for k in ("iters", "parameters", "timing", "token_range") if k in results
    }
    summary.update({k: results[k] for k in ("position_loss", "mqar", "ltm_sweep")})
    (args.results / "extrapolation.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, args.results / "extrapolation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
