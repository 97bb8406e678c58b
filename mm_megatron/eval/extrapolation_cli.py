"""Command line of the extrapolation suites: ``position-loss``, ``ltm-sweep`` and ``mqar``.

Each suite is a pair (``add_<suite>_args(parser)``, ``<suite>_command(args) -> dict``) in
:data:`SUBCOMMANDS`, registered as subcommands of ``tools/evaluate.py`` by
:func:`add_subcommands` and run by :func:`run_command`.
Every command loads ``--model`` (a Hugging Face directory or a Megatron checkpoint, see
:mod:`mm_megatron.eval.model_source`), optionally removes the long-term memory (``--no-ltm``,
Tables 2, 9, 10), prints a table and writes the JSON result to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1 (e.g. ``16,32,64``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def token_range(text: str) -> tuple[int, int]:
    """argparse type: ``lo,hi`` with 0 <= lo < hi."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lo,hi, got {text!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"need 0 <= lo < hi, got {text!r}")
    return lo, hi


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every suite: the model and the output."""
    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face directory, or Megatron run root / iter_* directory "
        "(converted in memory)",
    )
    p.add_argument(
        "--model-config", help="YAML whose model: section replaces a Megatron checkpoint's"
    )
    p.add_argument(
        "--no-ltm",
        action="store_true",
        help="MM v2: remove the long-term memory first (W_o keeps its STM half)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--output", help="write the JSON result here")


def _add_data_args(p: argparse.ArgumentParser, length_help: str) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="indexed dataset prefix (.bin/.idx) or .jsonl file of documents",
    )
    p.add_argument("--tokenizer", help="tokenizer for a .jsonl --data (default: the model's)")
    p.add_argument("--length", type=positive_int, help=length_help)
    p.add_argument(
        "--sequences",
        type=positive_int,
        default=16,
        help="documents to evaluate (the first long enough ones; default 16)",
    )
    p.add_argument("--bucket", type=positive_int, help="positions per bucket")
    p.add_argument("--batch-size", type=positive_int, default=1, help="sequences per forward")


def add_position_loss_args(p: argparse.ArgumentParser) -> None:
    """Options of ``position-loss``."""
    add_model_args(p)
    _add_data_args(p, "positions per sequence (default: 4 x the training length)")
    p.add_argument(
        "--train-length", type=positive_int, help="training context (default: the model config's)"
    )


def add_ltm_sweep_args(p: argparse.ArgumentParser) -> None:
    """Options of ``ltm-sweep``."""
    add_model_args(p)
    _add_data_args(p, "positions per sequence (default: the training length)")
    p.add_argument(
        "--offsets",
        type=int_list,
        required=True,
        help="inference m values, e.g. 16,32,64 (each in 1..stm_max_lag+1)",
    )
    p.add_argument(
        "--with-no-ltm",
        action="store_true",
        help="also evaluate the model without long-term memory",
    )


def add_mqar_args(p: argparse.ArgumentParser) -> None:
    """Options of ``mqar``."""
    add_model_args(p)
    p.add_argument(
        "--lengths",
        type=int_list,
        default=[256, 512, 1024, 2048],
        help="sequence lengths (default 256,512,1024,2048)",
    )
    p.add_argument(
        "--kv-pairs",
        type=positive_int,
        help="key-value pairs per sequence (default: length x --kv-per-token)",
    )
    p.add_argument(
        "--kv-per-token",
        type=float,
        default=1 / 16,
        help="pairs per token when --kv-pairs is not given (default 1/16)",
    )
    p.add_argument("--examples", type=positive_int, default=32, help="sequences per length")
    p.add_argument(
        "--token-range",
        type=token_range,
        help="lo,hi: token ids used (keys: lower half, values: upper half; default: "
        "0 up to the first special token)",
    )
    p.add_argument(
        "--power-a", type=float, default=0.01, help="Zoology's query-gap power law (default 0.01)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8)


def _load(args: argparse.Namespace) -> Any:
    from mm_megatron.eval.ltm_ablation import apply_ltm_removal
    from mm_megatron.eval.model_source import load_model

    loaded = load_model(args.model, device=args.device, model_config=args.model_config)
    if args.no_ltm:
        if loaded.arch != "mm":
            raise ValueError("--no-ltm applies to MM v2 models")
        apply_ltm_removal(loaded.model)
    return loaded


def _tokenizer(args: argparse.Namespace, loaded: Any) -> Any:
    if not str(args.data).endswith((".jsonl", ".json")):
        return None
    spec = args.tokenizer
    if spec is None:
        files = [f for f in loaded.tokenizer_files if f.name == "tokenizer.json"]
        if not files:
            raise ValueError("a .jsonl --data needs --tokenizer (the model has no tokenizer.json)")
        spec = files[0]
    from mm_megatron.data.tokenizers import load_tokenizer

    return load_tokenizer(str(spec))


def position_loss_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``position-loss``; returns its JSON-able result."""
    from mm_megatron.eval.position_loss import format_table, run_position_loss

    loaded = _load(args)
    result = run_position_loss(
        loaded.model,
        args.data,
        length=args.length,
        num_sequences=args.sequences,
        bucket_size=args.bucket,
        batch_size=args.batch_size,
        train_length=args.train_length or loaded.train_length,
        tokenizer=_tokenizer(args, loaded),
        device=args.device,
    )
    result.update(model=str(args.model), no_ltm=args.no_ltm)
    print(format_table(result))
    return result


def ltm_sweep_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``ltm-sweep``; returns its JSON-able result."""
    from mm_megatron.eval.ltm_ablation import format_sweep, run_ltm_sweep

    if args.no_ltm:
        raise ValueError("--no-ltm leaves no long-term memory to sweep; use --with-no-ltm")
    loaded = _load(args)
    if loaded.arch != "mm":
        raise ValueError("ltm-sweep applies to MM v2 models")
    result = run_ltm_sweep(
        loaded.model,
        args.data,
        args.offsets,
        length=args.length,
        num_sequences=args.sequences,
        bucket_size=args.bucket,
        batch_size=args.batch_size,
        include_no_ltm=args.with_no_ltm,
        tokenizer=_tokenizer(args, loaded),
        device=args.device,
    )
    result["model"] = str(args.model)
    print(format_sweep(result))
    return result


def default_token_range(vocab_size: int, special_ids: list[int | None]) -> tuple[int, int]:
    """[0, first special id) when the special tokens sit at the top of the vocabulary (as
    in our BPE and Llama 3), else the whole vocabulary."""
    specials = [s for s in special_ids if s is not None and s >= vocab_size // 2]
    return 0, min(specials, default=vocab_size)


def mqar_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``mqar``; returns its JSON-able result."""
    from mm_megatron.eval.mqar import run_mqar

    if not 0 < args.kv_per_token <= 0.25:
        raise ValueError(f"--kv-per-token must be in (0, 0.25], got {args.kv_per_token}")
    if not 0 < args.power_a <= 1:
        raise ValueError(f"--power-a must be in (0, 1], got {args.power_a}")
    loaded = _load(args)
    config = loaded.model.config
    bos = getattr(config, "bos_token_id", None)
    rng = args.token_range or default_token_range(
        config.vocab_size, [bos, getattr(config, "eos_token_id", None)]
    )
    result = run_mqar(
        loaded.model,
        args.lengths,
        token_range=rng,
        kv_pairs=args.kv_pairs,
        kv_per_token=args.kv_per_token,
        num_examples=args.examples,
        power_a=args.power_a,
        bos_id=bos,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    result.update(model=str(args.model), no_ltm=args.no_ltm, train_length=loaded.train_length)
    print("length  pairs  answers    loss  accuracy")
    for r in result["results"]:
        print(
            f"{r['length']:>6} {r['kv_pairs']:>6} {r['answers']:>8} {r['loss']:7.3f} "
            f"{r['accuracy']:9.4f}"
        )
    return result


SUBCOMMANDS: dict[
    str,
    tuple[
        Callable[[argparse.ArgumentParser], None],
        Callable[[argparse.Namespace], dict[str, Any]],
        str,
    ],
] = {
    "position-loss": (
        add_position_loss_args,
        position_loss_command,
        "validation loss by position bucket, beyond the training length",
    ),
    "ltm-sweep": (
        add_ltm_sweep_args,
        ltm_sweep_command,
        "loss at several inference LTM offsets m (and without LTM)",
    ),
    "mqar": (
        add_mqar_args,
        mqar_command,
        "multi-query associative recall (Zoology) at several lengths",
    ),
}


def run_command(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.suite`` (parsed with its ``add_args``): 0 done, 1 failed
    (message on stderr). Writes the JSON result to ``--output`` when given."""
    import warnings

    warnings.filterwarnings("ignore", module=r"(megatron|torch\.distributed\.checkpoint)\.")
    from mm_megatron.config_loading import ConfigError
    from mm_megatron.convert.outputs import ConversionError

    try:
        result = SUBCOMMANDS[args.suite][1](args)
    except (ValueError, TypeError, FileNotFoundError, ConversionError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
        print(f"wrote {args.output}")
    return 0


def add_subcommands(sub: Any) -> None:
    """Register the subcommands on an argparse sub-parser set (``tools/evaluate.py``)."""
    for name, (add_args, _, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_args(sp)
        sp.set_defaults(suite=name, extrapolation=True)
