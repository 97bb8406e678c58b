"""Validation loss by position, up to several times the training length.

The cheapest early signal of length extrapolation: a model that extrapolates keeps (or
lowers) its loss at positions beyond its training length; a transformer whose RoPE positions
are simply extrapolated usually degrades there. The paper measures extrapolation by task
accuracy at 32k after 4k training (§5.2, Table 3, RULER); this suite measures the per-token
loss as a function of the position in a document, on any Hugging Face causal LM (the MM v2
remote-code model or the Llama export of the baseline).

Positions: the loss at position p is the cross-entropy of token p+1 given tokens 0..p of the
same document (a sequence starts at a document's first token, its BOS as stored). Bucket k
holds positions [k·b, (k+1)·b).

Library entry point: :func:`run_position_loss` (returns a JSON-able dict). Token sources:
:func:`load_sequences` (indexed dataset prefix, or jsonl + tokenizer, or token lists).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
TokensSource = str | os.PathLike | Tensor | Sequence[Sequence[int]]
LOGIT_CHUNK = 1024  # positions per classifier call (bounds the [B, chunk, V] logits)


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _documents(source: str | os.PathLike, tokenizer: Any | None, json_key: str) -> Any:
    """Iterate the documents (token id arrays) of an indexed dataset prefix or a jsonl file."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        if tokenizer is None:
            raise ValueError(f"{source}: a jsonl source needs a tokenizer (--tokenizer)")
        if isinstance(tokenizer, str | os.PathLike):
            from mm_megatron.data.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer))
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[json_key]
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{source}:{lineno}: no text under key {json_key!r} ({err})"
                    ) from None
                ids = tokenizer.encode(text)  # as tools/preprocess_data.py: BOS + text + EOS
                if tokenizer.bos_id is not None:
                    ids = [tokenizer.bos_id, *ids]
                if tokenizer.eos_id is not None:
                    ids = [*ids, tokenizer.eos_id]
                yield np.asarray(ids, dtype=np.int64)
        return
    from mm_megatron.data.indexed import dataset_exists, read_index

    if not dataset_exists(source):
        raise FileNotFoundError(
            f"{source}: neither a .jsonl file nor an indexed dataset prefix (no {source}.bin/.idx)"
        )
    index = read_index(source)
    for i in range(index.num_documents):
        yield index.document(i)


def load_sequences(
    source: TokensSource,
    length: int,
    num_sequences: int | None = None,
    *,
    tokenizer: Any | None = None,
    json_key: str = "text",
) -> Tensor:
    """The first ``length + 1`` tokens of the first ``num_sequences`` documents (in file
    order) that have at least that many tokens, as ``[N, length + 1]`` int64.

    ``source``: an indexed dataset prefix (``.bin``/``.idx``), a ``.jsonl`` file (then
    ``tokenizer``, a tokenizer object or spec, encodes BOS + text + EOS as preprocessing
    does), a tensor ``[N, >= length + 1]`` or a list of token lists. Raises ValueError when
    no document is long enough.
    """
    _check_positive("length", length)
    _check_positive("num_sequences", num_sequences, allow_none=True)
    need = length + 1
    if isinstance(source, Tensor):
        if source.dim() != 2 or source.shape[1] < need:
            raise ValueError(f"token tensor must be [N, >= {need}], got {tuple(source.shape)}")
        return source[:num_sequences, :need].long()
    docs = (
        _documents(source, tokenizer, json_key)
        if isinstance(source, str | os.PathLike)
        else (np.asarray(d, dtype=np.int64) for d in source)
    )
    rows, longest = [], 0
    for doc in docs:
        longest = max(longest, len(doc))
        if len(doc) >= need:
            rows.append(torch.from_numpy(np.asarray(doc[:need], dtype=np.int64)))
            if num_sequences is not None and len(rows) == num_sequences:
                break
    if not rows:
        raise ValueError(
            f"{source if isinstance(source, str | os.PathLike) else 'tokens'}: no "
            f"document has length + 1 = {need} tokens (the longest has {longest}); "
            "lower the length"
        )
    return torch.stack(rows)


def _base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        raise TypeError(
            f"{type(model).__name__}: not a Hugging Face causal LM (no base model "
            "or output embeddings)"
        )
    return base, head


@torch.no_grad()
def token_losses(
    model: nn.Module,
    sequences: Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy and top-1 correctness of ``sequences`` ``[N, L + 1]``.

    Returns ``(loss, correct)``, each ``[N, L]`` on CPU: entry ``[i, p]`` scores the
    prediction of token p+1 from tokens 0..p (no cache, one document per row). The classifier
    runs on :data:`LOGIT_CHUNK` positions at a time, so long sequences with a large vocabulary
    do not materialise all logits at once.
    """
    _check_positive("batch_size", batch_size)
    base, head = _base_and_head(model)
    device = device or next(model.parameters()).device
    losses, correct = [], []
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, sequences.shape[0], batch_size):
            batch = sequences[b0 : b0 + batch_size].to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            hidden = base(input_ids=inputs, use_cache=False).last_hidden_state
            row_loss, row_ok = [], []
            for s in range(0, inputs.shape[1], LOGIT_CHUNK):
                logits = head(hidden[:, s : s + LOGIT_CHUNK]).float()
                tgt = targets[:, s : s + LOGIT_CHUNK]
                row_loss.append(F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none"))
                row_ok.append(logits.argmax(-1) == tgt)
            losses.append(torch.cat(row_loss, 1).cpu())
            correct.append(torch.cat(row_ok, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(losses), torch.cat(correct)


def bucket_table(loss: Tensor, correct: Tensor, bucket_size: int) -> list[dict[str, Any]]:
    """Mean loss, perplexity and accuracy per bucket of ``bucket_size`` positions."""
    _check_positive("bucket_size", bucket_size)
    rows = []
    for start in range(0, loss.shape[1], bucket_size):
        end = min(start + bucket_size, loss.shape[1])
        mean = loss[:, start:end].double().mean().item()
        rows.append(
            {
                "start": start,
                "end": end,
                "loss": mean,
                "ppl": math.exp(min(mean, 50)),
                "accuracy": correct[:, start:end].double().mean().item(),
                "tokens": int(loss[:, start:end].numel()),
            }
        )
    return rows


def summarize(
    loss: Tensor, correct: Tensor, bucket_size: int, train_length: int | None
) -> dict[str, Any]:
    """Overall and per-bucket figures; with ``train_length``, also the mean loss of the
    positions inside it and beyond it (the extrapolation gap)."""
    out: dict[str, Any] = {
        "loss": loss.double().mean().item(),
        "accuracy": correct.double().mean().item(),
        "buckets": bucket_table(loss, correct, bucket_size),
    }
    if train_length is not None and 0 < train_length < loss.shape[1]:
        inside = loss[:, :train_length].double().mean().item()
        beyond = loss[:, train_length:].double().mean().item()
        out.update(
            loss_within_train_length=inside,
            loss_beyond_train_length=beyond,
            extrapolation_gap=beyond - inside,
        )
    return out


def model_train_length(model: nn.Module) -> int | None:
    """The training length recorded in a Hugging Face config (``max_position_embeddings``:
    the export writes the training ``seq_length`` there), or None."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def run_position_loss(
    model: nn.Module,
    tokens_source: TokensSource,
    *,
    length: int | None = None,
    num_sequences: int = 16,
    bucket_size: int | None = None,
    batch_size: int = 1,
    train_length: int | None = None,
    tokenizer: Any | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Loss by position bucket (the "position-loss" suite).

    Args:
        model: a Hugging Face causal LM (MM v2 or Llama), evaluated without a cache.
        tokens_source: see :func:`load_sequences`.
        length: positions per sequence (default: 4 × the training length).
        num_sequences: documents (each at least ``length + 1`` tokens long) to evaluate.
        bucket_size: positions per bucket (default: ``length // 16``).
        batch_size: sequences per forward.
        train_length: the training context (default: the model config's
            ``max_position_embeddings``); splits the loss into inside and beyond it.
        tokenizer: for a jsonl source.
    Returns:
        ``{"suite", "length", "bucket_size", "num_sequences", "train_length", "loss",
        "accuracy", "buckets": [{"start", "end", "loss", "ppl", "accuracy", "tokens"}], ...}``
        plus ``loss_within_train_length``, ``loss_beyond_train_length`` and
        ``extrapolation_gap`` when the length exceeds the training length.
    """
    _check_positive("train_length", train_length, allow_none=True)
    train_length = train_length if train_length is not None else model_train_length(model)
    if length is None:
        if train_length is None:
            raise ValueError("length: give it (the model config records no training length)")
        length = 4 * train_length
    _check_positive("length", length)
    bucket_size = bucket_size if bucket_size is not None else max(1, length // 16)
    _check_positive("bucket_size", bucket_size)
    sequences = load_sequences(tokens_source, length, num_sequences, tokenizer=tokenizer)
    loss, correct = token_losses(model, sequences, batch_size, device)
    return {
        "suite": "position-loss",
        "length": length,
        "bucket_size": bucket_size,
        "num_sequences": int(sequences.shape[0]),
        "train_length": train_length,
        **summarize(loss, correct, bucket_size, train_length),
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`run_position_loss` result."""
    lines = [
        f"positions      loss     ppl  accuracy  ({result['num_sequences']} sequences of "
        f"{result['length']}, trained at {result.get('train_length')})"
    ]
    for b in result["buckets"]:
        lines.append(
            f"{b['start']:>5}-{b['end'] - 1:<6} {b['loss']:7.4f} {b['ppl']:7.2f} "
            f"{b['accuracy']:9.4f}"
        )
    if "extrapolation_gap" in result:
        lines.append(
            f"inside training length {result['loss_within_train_length']:.4f}, beyond "
            f"{result['loss_beyond_train_length']:.4f} (gap "
            f"{result['extrapolation_gap']:+.4f})"
        )
    return "\n".join(lines)
