"""Print a config's parameter count and FLOPs per token.

    python tools/model_stats.py --config pretrain/configs/mm_8b.yaml [--ctx 256] [key=value ...]

Parameters are counted without vocabulary padding (as the paper reports them). FLOPs per
token are given in the paper's convention at context ``--ctx`` (Table 2 uses 256) and as the
real cost of a training step at the config's sequence length (used for MFU); see
mm_megatron/flops.py. For MM v2 configs the "without long-term memory" ablation is shown too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mm_megatron.config import ModelConfig, load_model_config
from mm_megatron.config_loading import ConfigError
from mm_megatron.flops import count_params, paper_flops_per_token, training_flops_per_token


def human(n: float, digits: int = 3) -> str:
    """9926096896 -> '9.926B'; 1991968 -> '1.992M'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:.0f}"


def describe(cfg: ModelConfig, ctx: int) -> list[tuple[str, str]]:
    p = count_params(cfg)
    return [
        ("parameters", f"{human(p.total)} ({p.total:,})"),
        ("  non-embedding", human(p.non_embedding)),
        ("  embedding + classifier", f"{human(p.embedding + p.classifier)} (untied)"),
        (f"FLOPs/token, paper convention @ctx {ctx}", human(paper_flops_per_token(cfg, ctx), 1)),
        (
            f"FLOPs/token, training step @seq {cfg.seq_length}",
            f"{human(training_flops_per_token(cfg), 1)} (fwd+bwd)",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config with a model: section")
    parser.add_argument("--ctx", type=int, default=256, help="context for the paper's FLOP figure")
    parser.add_argument("overrides", nargs="*", help="model.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_model_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [(f"{args.config} ({cfg.arch})", "")] + describe(cfg, args.ctx)
    if cfg.arch == "mm" and cfg.long_term_memory:
        rows += [("without long-term memory", "")]
        rows += describe(dataclasses.replace(cfg, long_term_memory=False), args.ctx)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}" if value else key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
