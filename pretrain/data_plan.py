"""Checks of the training data before any work: provenance and the blend plan.

* **Provenance.** Every dataset of every blend must have been tokenized with the training
  tokenizer (``PREFIX.meta.json``, see :mod:`mm_megatron.data.provenance`). A mismatch is a
  configuration error: MM v2 resets its memories at the end-of-document id.
* **Blend plan.** For each training dataset: the tokens it holds (its share of the split when
  one blend is split into train/valid/test), the tokens the run will draw from it (its weight
  times ``train.tokens``), and the epochs that implies. Datasets repeated more than
  ``data.epochs_warning`` times are reported with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mm_megatron.config_loading import ConfigError
from mm_megatron.data.indexed import read_index
from mm_megatron.data.provenance import check_provenance, tokenizer_fingerprint
from mm_megatron.data.tokenizers import Tokenizer
from pretrain.config import Config
from pretrain.data import parse_blend


@dataclass
class PlanRow:
    """One dataset of the training blend."""

    prefix: str
    weight: float  # normalised sampling weight
    held: int  # tokens available to training
    drawn: float  # tokens the run draws from it

    @property
    def epochs(self) -> float:
        return self.drawn / self.held if self.held else float("inf")


def _blends(cfg: Config) -> dict[str, list]:
    out = {"data.train_blend": cfg.data.train_blend}
    for split in ("valid", "test"):
        blend = getattr(cfg.data, f"{split}_blend")
        if blend:
            out[f"data.{split}_blend"] = blend
    return out


def check_dataset_provenance(cfg: Config, tok: Tokenizer, log: Callable[[str], None]) -> None:
    """Raise ConfigError naming every dataset tokenized otherwise than the run's tokenizer."""
    fingerprint = tokenizer_fingerprint(tok)
    errors, notes = [], []
    for key, blend in _blends(cfg).items():
        parsed = parse_blend(list(blend), key)
        for prefix in parsed[0] if parsed else []:
            try:
                report = check_provenance(prefix, tok, fingerprint)
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None
            errors += [f"{key}: {e}" for e in report.errors]
            notes += [f"{key}: {n}" for n in report.notes]
    for note in notes:
        log(f"WARNING: {note}")
    if errors:
        raise ConfigError(
            "the training data does not match data.tokenizer "
            f"({cfg.data.tokenizer}):\n  " + "\n  ".join(errors)
        )


def blend_plan(cfg: Config) -> list[PlanRow]:
    """Tokens held, tokens drawn and epochs for each dataset of the training blend."""
    parsed = parse_blend(list(cfg.data.train_blend), "data.train_blend")
    if not parsed:
        return []
    prefixes, weights = parsed
    weights = weights or [1.0] * len(prefixes)
    total = sum(weights)
    share = 1.0
    if not (cfg.data.valid_blend or cfg.data.test_blend):
        parts = [float(x) for x in cfg.data.split.split(",")]
        share = parts[0] / sum(parts) if sum(parts) else 0.0
    run_tokens = cfg.train_iters * cfg.tokens_per_iter
    return [
        PlanRow(
            prefix,
            w / total,
            int(read_index(prefix, check_bin=False).num_tokens * share),
            run_tokens * w / total,
        )
        for prefix, w in zip(prefixes, weights, strict=True)
    ]


def format_plan(rows: list[PlanRow], run_tokens: int) -> str:
    """The plan as a table."""
    lines = [
        f"blend plan for {run_tokens:,} training tokens:",
        f"  {'weight':>7}  {'tokens held':>16}  {'tokens drawn':>16}  {'epochs':>7}  dataset",
    ]
    for r in rows:
        lines.append(
            f"  {r.weight:7.3f}  {r.held:16,}  {int(r.drawn):16,}  {r.epochs:7.2f}  {r.prefix}"
        )
    return "\n".join(lines)


def check_run_data(cfg: Config, tok: Tokenizer, log: Callable[[str], None]) -> list[PlanRow]:
    """Provenance, then the blend plan (printed, with warnings above data.epochs_warning)."""
    check_dataset_provenance(cfg, tok, log)
    rows = blend_plan(cfg)
    log(format_plan(rows, cfg.train_iters * cfg.tokens_per_iter))
    for r in rows:
        if r.epochs > cfg.data.epochs_warning:
            log(
                f"WARNING: {r.prefix} will be read {r.epochs:.2f} times (data.epochs_warning "
                f"{cfg.data.epochs_warning:g}): its documents repeat during the run"
            )
    return rows
