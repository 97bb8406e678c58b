"""Chunked prefill through the model's cache, greedy decoding, and continuation scoring.

Long prompts are fed to the model in chunks of ``chunk_size`` tokens on a growing cache, so
that activations stay O(chunk) and, for MM v2, the state stays O(context) (the
``MemoryMosaicsCache`` keeps the key recurrence, a short-term ring buffer and the long-term
pairs). The same loop drives the transformer baseline (``LlamaForCausalLM`` with a
``DynamicCache``). One forward per chunk gives exactly the function of one full forward
(``tests/test_eval_prefill.py`` checks the logits on both architectures).
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DEFAULT_CHUNK = 2048


def new_cache(model: Any) -> Any:
    """An empty cache of the model's own type: ``MemoryMosaicsCache`` for MM v2 (taken from
    the module the model was loaded from, i.e. the export's copy of the code), otherwise a
    ``DynamicCache``."""
    module = sys.modules[type(model).__module__]
    cls = getattr(module, "MemoryMosaicsCache", None)
    if cls is not None:
        return cls(model.config)
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model.forward`` takes the cache: ``cache`` (transformers
    >= 5.24, and MM v2 under any version) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class Prefilled:
    """The cache after a prompt and the next-token log-probabilities after its last token."""

    cache: Any
    next_logprobs: Tensor  # [vocab], fp32, on CPU
    length: int


@torch.no_grad()
def forward_chunks(
    model: Any,
    ids: Sequence[int] | Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    cache: Any = None,
    keep_logits: bool = False,
) -> tuple[Any, Tensor]:
    """Feed ``ids`` (one sequence) in chunks on ``cache`` (a new one if None).

    Returns the cache and the logits: of every position when ``keep_logits`` (``[T, V]``,
    fp32), else of the last position only (``[1, V]``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = torch.as_tensor(ids, dtype=torch.long).view(-1)
    if ids.numel() == 0:
        raise ValueError("empty prompt")
    cache = new_cache(model) if cache is None else cache
    device = _device(model)
    kept: list[Tensor] = []
    last = None
    for start in range(0, ids.numel(), chunk_size):
        chunk = ids[start : start + chunk_size].to(device).view(1, -1)
        out = model(
            input_ids=chunk,
            use_cache=True,
            logits_to_keep=0 if keep_logits else 1,
            **{cache_kwarg(model): cache},
        )
        cache = _returned_cache(out, cache)
        last = out.logits[0].float()
        if keep_logits:
            kept.append(last.cpu())
    logits = torch.cat(kept) if keep_logits else last[-1:].cpu()
    return cache, logits


def _returned_cache(out: Any, given: Any) -> Any:
    """The cache a forward returned (under ``past_key_values`` or ``cache``), else the given
    one (updated in place)."""
    for name in ("past_key_values", "cache"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return given


def prefill(
    model: Any, ids: Sequence[int] | Tensor, chunk_size: int = DEFAULT_CHUNK, cache: Any = None
) -> Prefilled:
    """Chunked prefill of one prompt: the cache and the log-probabilities of the next token."""
    cache, logits = forward_chunks(model, ids, chunk_size, cache)
    return Prefilled(cache, logits[-1].log_softmax(-1), len(ids))


@torch.no_grad()
def greedy_decode(
    model: Any, state: Prefilled, max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy tokens after a prefilled prompt, one token per step on the cache; stops after
    any of ``stop_ids``. The cache in ``state`` is consumed."""
    device = _device(model)
    cache, logprobs, out = state.cache, state.next_logprobs, []
    stops = set(stop_ids)
    for step in range(max_new_tokens):
        token = int(logprobs.argmax())
        out.append(token)
        if token in stops or step == max_new_tokens - 1:
            break
        res = model(
            input_ids=torch.tensor([[token]], device=device),
            use_cache=True,
            **{cache_kwarg(model): cache},
        )
        cache = _returned_cache(res, cache)
        logprobs = res.logits[0, -1].float().log_softmax(-1).cpu()
    return out


@dataclass
class ContinuationScore:
    """Log-likelihood of one continuation after a prompt (lm-eval's ``loglikelihood``)."""

    logprob: float  # sum over the continuation's tokens
    num_tokens: int
    is_greedy: bool  # every token is the argmax


@torch.no_grad()
def score_continuations(
    model: Any, state: Prefilled, continuations: Sequence[Sequence[int]], batch_size: int = 16
) -> list[ContinuationScore]:
    """Score each continuation after the prefilled prompt without re-reading the prompt.

    The cache is copied and repeated over a batch of continuations, which run as one
    right-padded batch without an attention mask: the model is causal, so padding after a
    continuation cannot change the logits of its own tokens. ``state`` is left unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(model)
    scores: list[ContinuationScore] = []
    first = state.next_logprobs
    for lo in range(0, len(continuations), batch_size):
        group = [list(c) for c in continuations[lo : lo + batch_size]]
        if any(not c for c in group):
            raise ValueError("empty continuation")
        longest = max(len(c) for c in group)
        logps: Tensor | None = None
        if longest > 1:
            cache = copy.deepcopy(state.cache)
            cache.batch_repeat_interleave(len(group))
            inputs = torch.tensor(
                [c[:-1] + [c[0]] * (longest - len(c)) for c in group], device=device
            )
            res = model(input_ids=inputs, use_cache=True, **{cache_kwarg(model): cache})
            logps = res.logits.float().log_softmax(-1).cpu()
        for row, cont in enumerate(group):
            dists = [first] + (
                [logps[row, i] for i in range(len(cont) - 1)] if logps is not None else []
            )
            total, greedy = 0.0, True
            for dist, token in zip(dists, cont, strict=True):
                total += float(dist[token])
                greedy = greedy and int(dist.argmax()) == token
            scores.append(ContinuationScore(total, len(cont), greedy))
    return scores
