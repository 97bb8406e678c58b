"""Multi-query associative recall (MQAR), as in the Zoology benchmark (Arora et al. 2023,
"Zoology: Measuring and Improving Recall in Efficient Language Models", ``multiquery_ar``).

A sequence holds ``n`` key-value pairs ``k₁ v₁ k₂ v₂ … kₙ vₙ`` (keys and values drawn without
replacement from two disjoint token sets), then the query region: each key appears once more,
at a position whose distance from the region's start follows Zoology's power law (``power_a``),
and every other query-region token is random filler. The answer to the query ``kᵢ`` is the
token ``vᵢ``: it is scored as the next-token prediction at the query position (loss and
top-1 accuracy over the whole vocabulary). The task is evaluated zero-shot here, with the
models trained on text: it measures in-context recall (induction) at and beyond the training
length, the kind of ability the paper credits MM v2 with (§5.2-5.3).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def mqar_batch(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    token_range: tuple[int, int],
    *,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    bos_id: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Zoology's ``multiquery_ar`` examples: ``(inputs, labels)``, each ``[N, seq_len]``.

    ``labels[i, p]`` is the value token expected after ``inputs[i, p]`` (a query key), -100
    elsewhere. Keys come from the lower half of ``token_range`` = [lo, hi), values from the
    upper half, filler from the whole range. With ``bos_id`` the sequence starts with it
    (as documents do in training) and the task fills the remaining ``seq_len - 1`` tokens.
    """
    lo, hi = token_range
    body = seq_len - (bos_id is not None)
    half = (hi - lo) // 2
    if num_examples < 1 or num_kv_pairs < 1:
        raise ValueError("num_examples and num_kv_pairs must be >= 1")
    if half < num_kv_pairs:
        raise ValueError(
            f"token_range {token_range} holds fewer than {num_kv_pairs} keys and "
            f"{num_kv_pairs} values"
        )
    context = 2 * num_kv_pairs
    space = (body - context) // 2
    if space < num_kv_pairs:
        raise ValueError(
            f"seq_len {seq_len} is too short for {num_kv_pairs} key-value pairs "
            f"and their queries (needs >= {4 * num_kv_pairs + (bos_id is not None)})"
        )
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    rng = np.random.default_rng(seed)
    keys = np.stack(
        [
            rng.choice(np.arange(lo, lo + half), num_kv_pairs, replace=False)
            for _ in range(num_examples)
        ]
    )
    values = np.stack(
        [
            rng.choice(np.arange(lo + half, hi), num_kv_pairs, replace=False)
            for _ in range(num_examples)
        ]
    )
    kvs = np.zeros((num_examples, context), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    gaps = np.stack(
        [rng.choice(space, num_kv_pairs, replace=False, p=p) for _ in range(num_examples)]
    )
    queries = np.full((num_examples, body - context), -1, dtype=np.int64)
    np.put_along_axis(queries, gaps * 2, keys, axis=1)
    inputs = np.concatenate([kvs, queries], axis=1)
    labels = np.full_like(inputs, -100)
    np.put_along_axis(labels, gaps * 2 + context, values, axis=1)
    filler = inputs < 0
    inputs[filler] = rng.integers(lo, hi, size=int(filler.sum())) if random_non_queries else lo
    if bos_id is not None:
        inputs = np.concatenate([np.full((num_examples, 1), bos_id), inputs], axis=1)
        labels = np.concatenate([np.full((num_examples, 1), -100), labels], axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


@torch.no_grad()
def score_answers(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and top-1 correctness of every answer (labels != -100), flat on CPU."""
    device = device or next(model.parameters()).device
    losses, correct = [], []
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, inputs.shape[0], batch_size):
            x = inputs[b0 : b0 + batch_size].to(device)
            y = labels[b0 : b0 + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            where = y != -100
            picked, target = logits[where], y[where]
            losses.append(F.cross_entropy(picked, target, reduction="none").cpu())
            correct.append((picked.argmax(-1) == target).cpu())
    finally:
        model.train(was_training)
    return torch.cat(losses), torch.cat(correct)


def run_mqar(
    model: nn.Module,
    lengths: Iterable[int],
    *,
    token_range: tuple[int, int],
    kv_pairs: int | None = None,
    kv_per_token: float = 1 / 16,
    num_examples: int = 32,
    power_a: float = 0.01,
    bos_id: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """MQAR loss and accuracy at each sequence length (the "mqar" suite).

    ``kv_pairs`` fixes the number of pairs; by default it scales with the length as in
    Zoology's sweeps (``round(length · kv_per_token)``, 16 pairs at 256 tokens). The same
    ``seed`` gives the same examples for every model. Returns ``{"suite", "token_range",
    "results": [{"length", "kv_pairs", "examples", "answers", "loss", "accuracy"}]}``.
    """
    lengths = list(lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 8 for n in lengths):
        raise ValueError(f"lengths must be integers >= 8, got {lengths}")
    if not 0 < kv_per_token <= 0.25:
        raise ValueError(f"kv_per_token must be in (0, 0.25], got {kv_per_token}")
    lo, hi = token_range
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not 0 <= lo < hi or (vocab is not None and hi > vocab):
        raise ValueError(
            f"token_range {token_range} must satisfy 0 <= lo < hi <= vocab_size ({vocab})"
        )
    results = []
    for i, length in enumerate(lengths):
        pairs = kv_pairs or max(1, round(length * kv_per_token))
        inputs, labels = mqar_batch(
            num_examples, length, pairs, token_range, power_a=power_a, bos_id=bos_id, seed=seed + i
        )
        loss, correct = score_answers(model, inputs, labels, batch_size, device)
        results.append(
            {
                "length": length,
                "kv_pairs": pairs,
                "examples": num_examples,
                "answers": int(loss.numel()),
                "loss": loss.double().mean().item(),
                "accuracy": correct.double().mean().item(),
            }
        )
    return {
        "suite": "mqar",
        "token_range": list(token_range),
        "power_a": power_a,
        "results": results,
    }
