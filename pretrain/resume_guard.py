"""Config drift on resume: compare the new config with the checkpoint's ``config.yaml``.

Every key of the resolved config falls in one of three classes:

* **refused** (the checkpoint cannot continue under it): the model's shape and recipe
  (every ``model.*`` key except the implementation choices in :data:`FREE_MODEL_KEYS`),
  the sequence length (``model.seq_length``), ``data.mock`` and the tokenizer (its files are
  compared with the copy saved next to the checkpoints, so a moved tokenizer is fine).
* **overridable** with ``checkpoint.allow_changes: [<kind>]`` (see :data:`OVERRIDABLE`):
  ``blend`` (what is read and in which order), ``batch_size``, ``lr_schedule`` (peak and
  final LR, warm-up, decay style, weight decay and the run length, which sets the decay
  length) and ``optimizer`` (Adam betas and eps, gradient clipping).
* **free** (layout, logging, checkpointing, stopping, kernels, micro-batch size): logged.

An accepted ``lr_schedule`` change must take effect: loading restores the checkpoint's
scheduler settings (Megatron's ``use_checkpoint_opt_param_scheduler``), so
:func:`apply_accepted_changes` puts the config's back afterwards, keeping the step count.
Likewise ``optimizer``: Adam's betas and eps live in the loaded param groups.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm_megatron.checkpoint import format as fmt
from mm_megatron.config_loading import ConfigError

FREE_MODEL_KEYS = frozenset(
    {
        "model.backend",
        "model.memory_backend",
        "model.scan_chunk_size",
        "model.ltm_offset_inference",
        "model.init_method_std",
    }
)
REFUSED_KEYS = frozenset({"data.mock"})
OVERRIDABLE: dict[str, frozenset[str]] = {
    "blend": frozenset(
        {
            "data.train_blend",
            "data.valid_blend",
            "data.test_blend",
            "data.split",
            "data.eod_mask_loss",
            "train.seed",
        }
    ),
    "batch_size": frozenset({"train.global_batch_size"}),
    "lr_schedule": frozenset(
        {
            "optimizer.lr",
            "optimizer.min_lr",
            "optimizer.warmup_iters",
            "optimizer.decay_style",
            "optimizer.weight_decay",
            "train.iters",
            "train.tokens",
        }
    ),
    "optimizer": frozenset(
        {"optimizer.beta1", "optimizer.beta2", "optimizer.eps", "optimizer.clip_grad"}
    ),
}
IGNORED_KEYS = frozenset({"checkpoint.allow_changes", "data.tokenizer"})


@dataclass
class Drift:
    """The differences between a checkpoint's config and the new one, classified."""

    refused: list[str] = field(default_factory=list)
    needs_override: dict[str, list[str]] = field(default_factory=dict)
    accepted: dict[str, list[str]] = field(default_factory=dict)
    free: list[str] = field(default_factory=list)


def flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    if not isinstance(mapping, dict):
        return {prefix: mapping}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        out.update(
            flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}")
        )
    return out


def kind_of(key: str) -> str | None:
    """The override kind needed to change ``key``, "refused", or None when it is free."""
    if key in REFUSED_KEYS or (key.startswith("model.") and key not in FREE_MODEL_KEYS):
        return "refused"
    for kind, keys in OVERRIDABLE.items():
        if key in keys:
            return kind
    return None


def _digest(files: Iterable[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def compare(old: dict[str, Any], new: dict[str, Any], allowed: Iterable[str]) -> Drift:
    """Classify every key whose value differs between ``old`` and ``new`` resolved configs."""
    allowed = set(allowed)
    a, b = flatten(old), flatten(new)
    drift = Drift()
    for key in sorted(set(a) | set(b)):
        if key in IGNORED_KEYS or a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        kind = kind_of(key)
        if kind == "refused":
            drift.refused.append(line)
        elif kind is None:
            drift.free.append(line)
        else:
            target = drift.accepted if kind in allowed else drift.needs_override
            target.setdefault(kind, []).append(line)
    return drift


def tokenizer_problem(saved_dir: Path, files: list[str] | None) -> str | None:
    """Why the run's tokenizer differs from the copy saved with the checkpoints, or None."""
    if files is None or not saved_dir.is_dir():
        return None
    saved, current = _digest(sorted(saved_dir.iterdir())), _digest(Path(f) for f in files)
    if saved and saved != current:
        return (
            f"data.tokenizer: its files ({', '.join(sorted(current))}) differ from the "
            f"tokenizer the checkpoints were trained with ({saved_dir})"
        )
    return None


def check_resume_config(
    checkpoint: Path,
    root: str,
    resolved: dict[str, Any],
    allowed: list[str],
    tokenizer_files: list[str] | None,
    log: Callable[[str], None],
) -> Drift:
    """Compare the config with ``checkpoint/config.yaml``; raise ConfigError on what is
    refused or not allowed, log what is accepted. Returns the drift (empty if unknown)."""
    saved = checkpoint / fmt.RUN_CONFIG
    if not saved.is_file():
        log(f"warning: {checkpoint} has no config.yaml; the config cannot be compared")
        return Drift()
    old = yaml.safe_load(saved.read_text()) or {}
    drift = compare(old, resolved, allowed)
    problems = [f"  {line} (would corrupt the run; refused)" for line in drift.refused]
    tok = tokenizer_problem(Path(root) / fmt.TOKENIZER_DIR, tokenizer_files)
    if tok:
        problems.append(f"  {tok} (refused)")
    for kind, lines in drift.needs_override.items():
        problems += [
            f"  {line} (a {kind} change: add {kind} to checkpoint.allow_changes to accept it)"
            for line in lines
        ]
    if problems:
        raise ConfigError(
            f"checkpoint.allow_changes: the config differs from the one {checkpoint} was "
            "trained with:\n" + "\n".join(problems) + "\nStart a new run in another "
            "checkpoint.dir (checkpoint.init_from to reuse the weights) to change the rest."
        )
    for kind, lines in drift.accepted.items():
        for line in lines:
            log(f"config change on resume, accepted by checkpoint.allow_changes ({kind}): {line}")
    for line in drift.free:
        log(f"config change on resume: {line}")
    return drift


def apply_accepted_changes(drift: Drift, cfg: Any, optimizer: Any, scheduler: Any) -> None:
    """After loading: make accepted optimizer and LR-schedule changes take effect.

    Loading restores the checkpoint's scheduler settings (Megatron's
    ``use_checkpoint_opt_param_scheduler``) and the param groups' betas, eps, max/min LR;
    put the config's values back (as :func:`pretrain.components.build_optimizer` sets them),
    keep the step count, and recompute the LR and weight decay for the current step.
    """
    o = cfg.optimizer
    if "optimizer" in drift.accepted:
        for group in optimizer.param_groups:
            group["betas"] = (o.beta1, o.beta2)
            group["eps"] = o.eps
    if "lr_schedule" in drift.accepted and scheduler is not None:
        scheduler.max_lr, scheduler.min_lr = o.lr, o.final_lr
        scheduler.lr_warmup_steps = o.warmup_iters
        scheduler.lr_decay_steps = scheduler.wd_incr_steps = cfg.train_iters
        scheduler.lr_decay_style = o.decay_style
        scheduler.start_wd = scheduler.end_wd = o.weight_decay
        for group in optimizer.param_groups:
            if "max_lr" in group:
                group["max_lr"] = o.lr
            if "min_lr" in group:
                group["min_lr"] = o.final_lr
        scheduler.step(increment=0)  # every group's LR and WD for the current step


def guard_resume(
    checkpoint: Path,
    cfg: Any,
    resolved: dict[str, Any],
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    log: Callable[[str], None],
) -> Drift:
    """The resume hook of the trainer, after loading ``checkpoint``: check, then apply."""
    root = cfg.checkpoint.dir
    files = [str(f) for f in tokenizer.files()] if tokenizer is not None else None
    drift = check_resume_config(
        checkpoint, root, resolved, cfg.checkpoint.allow_changes, files, log
    )
    apply_accepted_changes(drift, cfg, optimizer, scheduler)
    return drift
