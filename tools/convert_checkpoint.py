"""Convert checkpoints: Megatron → Hugging Face, Hugging Face → Megatron, Megatron → Megatron.

    # a training run (the tracker's iteration) or one iter_* directory → HF directory
    python tools/convert_checkpoint.py --to hf --load runs/mm/checkpoints --save exports/mm

    # the same without the long-term memory (the "without LTM" ablation, Tables 2, 9, 10)
    python tools/convert_checkpoint.py --to hf --drop-ltm --load runs/mm/checkpoints \\
        --save exports/mm_no_ltm

    # an exported HF directory → a model-only Megatron checkpoint at TP=2, PP=2
    python tools/convert_checkpoint.py --to megatron --load exports/mm --save ckpt/mm_tp2pp2 \\
        --target-tp 2 --target-pp 2

    # reshard a training checkpoint (drops optimizer, scheduler and data state)
    python tools/convert_checkpoint.py --to megatron --load runs/mm/checkpoints \\
        --save ckpt/mm_tp1 --target-tp 1 --target-pp 1

Every conversion checks itself before its output appears: the HF export compares the logits
of the written model with the Megatron model's on a fixed prompt (max |Δlogit|, KL), a
Megatron checkpoint is loaded back and compared tensor by tensor (and, from HF, on logits).
Output is written into a temporary sibling directory and renamed at the end; a failure
leaves nothing at ``--save``. Exit status: 0 done, 1 failed (the message names the file), 2
usage error. See docs/release.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--to", required=True, choices=("hf", "megatron"), help="output format")
    p.add_argument(
        "--load",
        required=True,
        help="Megatron run root or iter_* directory, or a Hugging Face directory",
    )
    p.add_argument("--save", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument(
        "--tokenizer",
        help="tokenizer file or directory (default: <root>/tokenizer "
        "of a Megatron run, the tokenizer files of a Hugging Face directory)",
    )
    p.add_argument(
        "--model-config",
        help="YAML whose model: section replaces the source's "
        "model config (a training config or a checkpoint's config.yaml)",
    )
    p.add_argument("--target-tp", type=int, default=1, help="--to megatron: tensor parallel")
    p.add_argument("--target-pp", type=int, default=1, help="--to megatron: pipeline parallel")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="dtype of the written weights (auto: as stored)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="--to hf: bytes per safetensors shard")
    p.add_argument(
        "--parity-tolerance",
        type=float,
        default=1e-3,
        help="max |logit difference| allowed (fp32 forwards of the same weights)",
    )
    p.add_argument(
        "--kl-tolerance",
        type=float,
        default=1e-5,
        help="max per-position KL(source || converted) allowed, nats",
    )
    p.add_argument(
        "--parity",
        choices=("sample", "full", "none"),
        default=None,
        help="logit parity check: sample (default: embeddings, output layer and "
        "the first and last layers, so memory stays a few layers), full (the whole "
        "model, in fp32 on both sides: about 8 bytes per parameter each), none",
    )
    p.add_argument("--no-parity", action="store_true", help="same as --parity none")
    p.add_argument(
        "--license",
        metavar="FILE",
        help="--to hf: a license file to copy into the export; the model card names it",
    )
    p.add_argument(
        "--drop-ltm",
        action="store_true",
        help="--to hf, MM v2: export without the long-term memory (W_o keeps its STM "
        "half; config long_term_memory: false); parity is checked against the "
        "Megatron model built without LTM on those weights (in memory, not streamed)",
    )
    args = p.parse_args(argv)
    if args.no_parity and args.parity not in (None, "none"):
        p.error(f"--no-parity contradicts --parity {args.parity}")
    args.parity = "none" if args.no_parity else (args.parity or "sample")
    if args.target_tp < 1 or args.target_pp < 1:
        p.error("--target-tp and --target-pp must be >= 1")
    if args.to == "hf" and (args.target_tp, args.target_pp) != (1, 1):
        p.error("--target-tp/--target-pp apply to --to megatron")
    if args.license is not None and args.to != "hf":
        p.error("--license applies to --to hf")
    if args.drop_ltm and args.to != "hf":
        p.error("--drop-ltm applies to --to hf")
    return args


def _dtype(name: str) -> Any:
    import torch

    return None if name == "auto" else getattr(torch, name)


def _cast(state: dict, dtype: Any) -> dict:
    return state if dtype is None else {k: v.to(dtype) for k, v in state.items()}


def _tokenizer(args: argparse.Namespace) -> Path | None:
    from mm_megatron.convert.outputs import ConversionError

    if args.tokenizer is None:
        return None
    if not Path(args.tokenizer).exists():
        raise ConversionError(f"--tokenizer {args.tokenizer}: not found")
    return Path(args.tokenizer)


def to_hf(args: argparse.Namespace, model_cfg: Any) -> str:
    """Megatron checkpoint → HF directory, layer by layer (parity: Megatron model vs the
    written model, whole or sampled)."""
    from mm_megatron.convert.layer_reader import MegatronLayerReader
    from mm_megatron.convert.outputs import ConversionError
    from mm_megatron.convert.stream_hf import export_hf_stream

    if args.license is not None and not Path(args.license).is_file():
        raise ConversionError(f"--license {args.license}: not found (or not a file)")
    if args.drop_ltm:
        return _to_hf_without_ltm(args, model_cfg)
    reader = MegatronLayerReader(args.load, model_cfg, _tokenizer(args))
    report = export_hf_stream(
        reader,
        args.save,
        dtype=_dtype(args.dtype),
        max_shard_size=args.max_shard_size,
        parity=args.parity,
        max_abs_tol=args.parity_tolerance,
        kl_tol=args.kl_tolerance,
        overwrite=args.overwrite,
        license_file=args.license,
    )
    count = len(reader.global_names) + reader.cfg.num_layers * len(reader.layer_names)
    layout = reader.layout
    lines = [
        f"read {reader.path} (iteration {reader.iteration}, saved at TP={layout.get('tp')} "
        f"PP={layout.get('pp')}), {reader.cfg.arch}, {count} tensors",
        f"wrote {args.save} ({'Llama' if reader.cfg.arch != 'mm' else 'MM v2'} format, "
        f"{len(reader.tokenizer_files)} tokenizer files)",
    ]
    return "\n".join(lines + report)


def _to_hf_without_ltm(args: argparse.Namespace, model_cfg: Any) -> str:
    """Megatron checkpoint → HF directory of the model without long-term memory (in memory)."""
    from mm_megatron.convert.hf_export import export_hf
    from mm_megatron.convert.megatron_io import load_megatron_checkpoint
    from mm_megatron.convert.megatron_lm import MegatronLM
    from mm_megatron.eval.ltm_ablation import drop_ltm_megatron

    ckpt = load_megatron_checkpoint(args.load, model_cfg, _tokenizer(args))
    weights, cfg = drop_ltm_megatron(ckpt.state_dict, ckpt.cfg)
    weights = _cast(weights, _dtype(args.dtype))
    check = args.parity != "none"
    reference = MegatronLM(weights, cfg).logits if check else None
    report = export_hf(
        weights,
        cfg,
        args.save,
        ckpt.tokenizer_files,
        max_shard_size=args.max_shard_size,
        check=check,
        reference=reference,
        max_abs_tol=args.parity_tolerance,
        kl_tol=args.kl_tolerance,
        overwrite=args.overwrite,
        run_config=ckpt.config,
        iteration=ckpt.iteration,
        license_file=args.license,
    )
    layout = ckpt.layout
    lines = [
        f"read {ckpt.path} (iteration {ckpt.iteration}, saved at TP={layout.get('tp')} "
        f"PP={layout.get('pp')}), {ckpt.cfg.arch}, {len(ckpt.state_dict)} tensors",
        f"wrote {args.save} (MM v2 format, without long-term memory, "
        f"{len(ckpt.tokenizer_files)} tokenizer files)",
    ]
    lines.append(str(report) if report else "parity check skipped (--parity none)")
    return "\n".join(lines)


def to_megatron(args: argparse.Namespace, model_cfg: Any) -> str:
    """HF directory or Megatron checkpoint → model-only Megatron checkpoint at the target
    layout, layer by layer (checked by loading it back; from HF also on logits)."""
    from mm_megatron.checkpoint.format import iteration_dir, tokenizer_files
    from mm_megatron.convert.hf_import import HFSource
    from mm_megatron.convert.layer_reader import MegatronLayerReader
    from mm_megatron.convert.stream_megatron import hf_parity_check, save_megatron_stream

    source_dir = Path(args.load)
    tokenizer = _tokenizer(args)
    if (source_dir / "config.json").is_file():
        source: Any = HFSource(source_dir, model_cfg)
        files = tokenizer_files(tokenizer or source_dir)
        config, iteration, origin = None, 0, f"Hugging Face directory {source_dir}"
        check = hf_parity_check(source, args.parity, args.parity_tolerance, args.kl_tolerance)
    else:
        source = MegatronLayerReader(source_dir, model_cfg, tokenizer)
        files, config, iteration = source.tokenizer_files, source.config, source.iteration
        origin = (
            f"{source.path} (iteration {iteration}, saved at "
            f"TP={source.layout.get('tp')} PP={source.layout.get('pp')})"
        )
        check = None
    lines = save_megatron_stream(
        source,
        args.save,
        tp=args.target_tp,
        pp=args.target_pp,
        tokenizer=files,
        config=config,
        iteration=iteration,
        dtype=_dtype(args.dtype),
        overwrite=args.overwrite,
        check=check,
    )
    path = iteration_dir(args.save, iteration)
    return "\n".join(
        [
            f"read {origin}",
            f"wrote model-only checkpoint {path} at TP={args.target_tp} "
            f"PP={args.target_pp} ({len(files)} tokenizer files)",
            *lines,
        ]
    )


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM: unwind like an error, so that the temporary directory is removed."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    # megatron-core's notices (no Apex/TE on CPU) and torch.distributed.checkpoint deprecations
    warnings.filterwarnings("ignore", module=r"(megatron|torch\.distributed\.checkpoint)\.")
    from mm_megatron.config import load_model_config
    from mm_megatron.config_loading import ConfigError
    from mm_megatron.convert.outputs import ConversionError, check_output_dir
    from mm_megatron.convert.parity import ParityError

    try:
        save, load = Path(args.save).resolve(), Path(args.load).resolve()
        if save == load or save in load.parents:
            raise ConversionError(f"--save {args.save} would replace the source {args.load}")
        check_output_dir(Path(args.save), args.overwrite)
        model_cfg = load_model_config(args.model_config) if args.model_config else None
        convert = to_hf if args.to == "hf" else to_megatron
        if args.to == "hf" and (Path(args.load) / "config.json").is_file():
            raise ConversionError(f"{args.load}: already a Hugging Face directory")
        print(convert(args, model_cfg))
    except (ConversionError, ConfigError, ParityError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
