"""Parity of decoding through ``model.generate``: the path users take, not only ``forward``.

A forward-only parity check passed while ``generate`` decoded wrong tokens on a newer
transformers (the cache argument was renamed, so every step started from an empty cache). This
check drives the exported model through ``generate`` itself, greedy, with the cache and without
it, and compares each step's logits with an independent reference run on the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class DecodeParity:
    """Figures of greedy decoding through ``generate`` against the reference."""

    new_tokens: int  # tokens decoded after the prompt
    cached_max_abs_diff: float  # max |Δ| of the step logits with the cache vs the reference
    uncached_max_abs_diff: float  # the same with use_cache=False
    same_tokens: bool  # cached and uncached generate chose the same tokens


def _greedy(model: torch.nn.Module, prompt: Tensor, new_tokens: int, use_cache: bool,
            ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Greedy tokens ``[1, T + new]`` and the step logits ``[1, new, V]`` from generate."""
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=use_cache,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1).float().cpu()


def _step_diff(reference: Callable[[Tensor], Tensor], seq: Tensor, logits: Tensor,
               prompt_len: int) -> float:  # fmt: skip
    """max |Δ| between generate's step logits and the reference's logits of the same tokens."""
    ref = reference(seq[:, :-1]).float().cpu()[:, prompt_len - 1 :]
    return (ref - logits).abs().max().item()


@torch.no_grad()
def decode_parity(model: torch.nn.Module, reference: Callable[[Tensor], Tensor], prompt: Tensor,
                  new_tokens: int) -> DecodeParity:  # fmt: skip
    """Greedy decoding of ``new_tokens`` after ``prompt`` ``[1, T]`` through ``model.generate``,
    with and without the cache; each step's logits are compared with ``reference`` (logits of
    a whole sequence) on the tokens generate chose."""
    cached, cached_logits = _greedy(model, prompt, new_tokens, use_cache=True)
    plain, plain_logits = _greedy(model, prompt, new_tokens, use_cache=False)
    T = prompt.shape[1]
    return DecodeParity(
        new_tokens=new_tokens,
        cached_max_abs_diff=_step_diff(reference, cached.cpu(), cached_logits, T),
        uncached_max_abs_diff=_step_diff(reference, plain.cpu(), plain_logits, T),
        same_tokens=torch.equal(cached, plain),
    )
