"""Long-term memory removed after training, and the sweep of the inference offset m.

The paper's Tables 2, 9 and 10 evaluate trained MM v2 models "without long-term memory":
every block then computes ``x ← x + W_o^S · STM(RMSNorm₁ x)``, where ``W_o^S`` is the half of
the output projection ``W_o`` (d × 2d, input columns ``[STM heads ‖ LTM heads]``, §3.3 and
Fig. 2) that multiplies the short-term memory's output. That is exactly the model built with
``long_term_memory: false`` holding the same weights and ``W_o^S`` as its projection:

* :func:`apply_ltm_removal` turns a loaded model into it, in place;
* :func:`drop_ltm_state_dict` / :func:`drop_ltm_megatron` do it on weights (the export
  option ``tools/convert_checkpoint.py --to hf --drop-ltm``).

The long-term memory at position t reads pairs 0..t-m (Eq. 10); m is drawn in [64, 256]
during training and fixed to 64 at inference (§3.3, Table 12). :func:`run_ltm_sweep`
evaluates a trained model at several inference m, validated to 1 ≤ m ≤ stm_max_lag + 1 (a
larger m would leave the pairs with lag in (stm_max_lag, m) in neither memory).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mm_megatron.config import ModelConfig, max_ltm_offset
from mm_megatron.eval.position_loss import (
    TokensSource,
    load_sequences,
    model_train_length,
    summarize,
    token_losses,
)

Tensor = torch.Tensor
LTM = "long"  # key of the long-term memory in each block's ``memories`` ModuleDict
_LTM_KEY = re.compile(r"(^|\.)memories\.long\.")
_WO_KEY = re.compile(r"(^|\.)W_o\.weight$")


def _mm_parts(model: nn.Module) -> tuple[Any, list[nn.Module]]:
    """(config, blocks) of an MM v2 model: the Hugging Face ``MemoryMosaicsForCausalLM`` /
    ``MemoryMosaicsModel`` (config: ``MemoryMosaicsConfig``) or the plain
    :class:`~mm_megatron.reference.ReferenceMMModel` (config: ``ModelConfig``)."""
    inner = getattr(model, "model", model)
    blocks = getattr(inner, "blocks", None)
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    if blocks is None or config is None or not all(hasattr(b, "memories") for b in blocks):
        raise TypeError(
            f"{type(model).__name__} is not an MM v2 model (no blocks with "
            "memories); the LTM switches apply to Memory Mosaics only"
        )
    return config, list(blocks)


def _stm_max_lag(config: Any) -> int:
    return int(config.stm_max_lag)


def has_ltm(model: nn.Module) -> bool:
    """Whether the MM v2 model still has its long-term memories."""
    _, blocks = _mm_parts(model)
    return all(LTM in b.memories for b in blocks)


@torch.no_grad()
def apply_ltm_removal(model: nn.Module) -> nn.Module:
    """Remove the long-term memory of every block, in place, and return ``model``.

    Each block loses ``memories["long"]`` and its ``W_o`` (d × 2d) becomes a d × d linear
    layer holding the STM columns ``W_o[:, :d]``; the config's ``long_term_memory`` becomes
    False. The model then computes exactly what a model built with ``long_term_memory:
    false`` computes with those weights (the "without LTM" rows of Tables 2, 9 and 10).
    Works on the Hugging Face ``MemoryMosaicsForCausalLM`` / ``MemoryMosaicsModel`` and on
    :class:`~mm_megatron.reference.ReferenceMMModel`. Apply it before decoding: a
    ``MemoryMosaicsCache`` filled earlier still holds long-term pairs and must not be reused.
    Device, dtype and ``requires_grad`` of the kept weights are preserved.

    Raises:
        TypeError: not an MM v2 model, or ``W_o`` is not a plain ``nn.Linear`` (e.g. wrapped
            by an adapter: merge it first).
        ValueError: the model has no long-term memory.
    """
    config, blocks = _mm_parts(model)
    if not config.long_term_memory or not has_ltm(model):
        raise ValueError(
            "the model has no long-term memory to remove (long_term_memory is already false)"
        )
    d = int(config.hidden_size)
    for block in blocks:
        old = block.W_o
        if type(old) is not nn.Linear or old.in_features != 2 * d or old.bias is not None:
            raise TypeError(
                f"W_o must be a bias-free nn.Linear({2 * d}, {d}) [STM ‖ LTM], got "
                f"{old!r}; merge adapters before removing the LTM"
            )
        new = nn.Linear(d, d, bias=False, device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight[:, :d])
        new.weight.requires_grad_(old.weight.requires_grad)
        if hasattr(old, "table6_std"):
            new.table6_std = old.table6_std
        block.W_o = new
        del block.memories[LTM]
    if isinstance(config, ModelConfig):  # ReferenceMMModel: a ModelConfig shared with others
        config = dataclasses.replace(config, long_term_memory=False)
        model.cfg = config
        for block in blocks:
            block.cfg = config
    else:
        config.long_term_memory = False
    return model


def drop_ltm_state_dict(state: dict[str, Tensor], hidden_size: int) -> dict[str, Tensor]:
    """Weights in the reference or Hugging Face layout (any key prefix) without the LTM:
    ``*.memories.long.*`` dropped, every ``*.W_o.weight`` (d × 2d) cut to its STM half."""
    out = {}
    for key, value in state.items():
        if _LTM_KEY.search(key):
            continue
        if _WO_KEY.search(key):
            if value.shape[-1] != 2 * hidden_size:
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} is not [d, 2d] with "
                    f"d = {hidden_size}; the weights have no LTM half"
                )
            value = value[:, :hidden_size].clone()
        out[key] = value
    return out


def drop_ltm_megatron(meg: dict[str, Tensor], cfg: Any) -> tuple[dict[str, Tensor], Any]:
    """A full Megatron MM v2 state dict without the LTM, and the matching ``ModelConfig``
    (``long_term_memory: false``); the vocabulary padding is kept as stored."""
    from mm_megatron.convert.megatron_state import untangle_fused_norms
    from mm_megatron.convert.mm_layout import megatron_to_reference, reference_to_megatron

    if cfg.arch != "mm":
        raise ValueError(f"--drop-ltm applies to MM v2 models, not arch {cfg.arch!r}")
    if not cfg.long_term_memory:
        raise ValueError("the checkpoint has no long-term memory (long_term_memory: false)")
    meg = untangle_fused_norms(meg)
    ref = drop_ltm_state_dict(megatron_to_reference(meg, cfg), cfg.hidden_size)
    new_cfg = dataclasses.replace(cfg, long_term_memory=False)
    rows = meg["embedding.word_embeddings.weight"].shape[0]
    return reference_to_megatron(ref, new_cfg, padded_vocab=rows), new_cfg


def check_ltm_offset(m: Any, stm_max_lag: int) -> int:
    """``m`` as an int in the legal range [1, stm_max_lag + 1], or ValueError."""
    if isinstance(m, bool) or not isinstance(m, int):
        raise ValueError(f"ltm offset m must be an integer, got {m!r}")
    if not 1 <= m <= max_ltm_offset(stm_max_lag):
        raise ValueError(
            f"ltm offset m={m} is outside [1, stm_max_lag + 1 = {stm_max_lag + 1}]: "
            "a larger m leaves some pairs in neither memory (Eq. 10)"
        )
    return m


def get_ltm_offset(model: nn.Module) -> int:
    """The inference m the MM v2 model uses now."""
    config, blocks = _mm_parts(model)
    if isinstance(config, ModelConfig):
        m = getattr(model, "ltm_offset", None)
        return int(m if m is not None else config.ltm_offset_inference)
    return int(config.ltm_offset)


def set_ltm_offset(model: nn.Module, m: int) -> int:
    """Set the inference offset m of every long-term memory (validated); returns the
    previous m. Hugging Face model: ``config.ltm_offset`` and each LTM's smallest lag;
    reference model: its ``ltm_offset``."""
    config, blocks = _mm_parts(model)
    if not has_ltm(model):
        raise ValueError("the model has no long-term memory: m has no effect")
    check_ltm_offset(m, _stm_max_lag(config))
    previous = get_ltm_offset(model)
    if isinstance(config, ModelConfig):
        model.ltm_offset = m
    else:
        config.ltm_offset = m
        for block in blocks:
            block.memories[LTM].min_lag = m
    return previous


def run_ltm_sweep(
    model: nn.Module,
    tokens_source: TokensSource,
    offsets: Iterable[int],
    *,
    length: int | None = None,
    num_sequences: int = 16,
    bucket_size: int | None = None,
    batch_size: int = 1,
    include_no_ltm: bool = False,
    tokenizer: Any | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Loss and accuracy of an MM v2 model at several inference offsets m (the "ltm-sweep"
    suite); optionally also without long-term memory (Tables 2, 9, 10).

    The model's own m is restored afterwards; the LTM removal runs on a deep copy, so
    ``model`` is left unchanged (``include_no_ltm`` needs memory for a second model).

    Args:
        offsets: the m values, each in [1, stm_max_lag + 1] (checked before any work).
        length: positions per sequence (default: the training length recorded in the config).
        Other arguments: as :func:`~mm_megatron.eval.position_loss.run_position_loss`.
    Returns:
        ``{"suite", "length", "num_sequences", "train_length", "model_ltm_offset",
        "results": [{"ltm_offset", "loss", "accuracy", "buckets", ...}],
        "without_ltm": {...} or None}``.
    """
    config, _ = _mm_parts(model)
    if not has_ltm(model):
        raise ValueError("the model has no long-term memory to sweep m over")
    offsets = [check_ltm_offset(m, _stm_max_lag(config)) for m in offsets]
    if not offsets:
        raise ValueError("offsets: give at least one m")
    train_length = model_train_length(model)
    length = length if length is not None else train_length
    if length is None:
        raise ValueError("length: give it (the model config records no training length)")
    bucket_size = bucket_size if bucket_size is not None else length
    sequences = load_sequences(tokens_source, length, num_sequences, tokenizer=tokenizer)
    original = get_ltm_offset(model)
    results = []
    try:
        for m in offsets:
            set_ltm_offset(model, m)
            loss, correct = token_losses(model, sequences, batch_size, device)
            results.append({"ltm_offset": m, **summarize(loss, correct, bucket_size, train_length)})
    finally:
        set_ltm_offset(model, original)
    without = None
    if include_no_ltm:
        ablated = apply_ltm_removal(copy.deepcopy(model))
        loss, correct = token_losses(ablated, sequences, batch_size, device)
        without = summarize(loss, correct, bucket_size, train_length)
        del ablated
    return {
        "suite": "ltm-sweep",
        "length": length,
        "num_sequences": int(sequences.shape[0]),
        "bucket_size": bucket_size,
        "train_length": train_length,
        "model_ltm_offset": original,
        "results": results,
        "without_ltm": without,
    }


def format_sweep(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`run_ltm_sweep` result."""
    lines = [
        f"     m     loss  accuracy  ({result['num_sequences']} sequences of "
        f"{result['length']}; model m = {result['model_ltm_offset']})"
    ]
    for r in result["results"]:
        lines.append(f"{r['ltm_offset']:>6} {r['loss']:8.4f} {r['accuracy']:9.4f}")
    if result.get("without_ltm"):
        w = result["without_ltm"]
        lines.append(f"{'no LTM':>6} {w['loss']:8.4f} {w['accuracy']:9.4f}")
    return "\n".join(lines)
