"""Logit parity of a conversion, in either direction: the converted model against a reference.

The figures are the max |logit difference| of a full forward and KL(p_ref || p_converted) per
position (max and mean) on a fixed prompt. An exported HF model is also driven through
``model.generate``, the path users take, not only ``forward``: a forward-only check once
passed while ``generate`` decoded wrong tokens on a newer transformers (the cache argument was
renamed, so every step started from an empty cache). Decoding is greedy, with the cache and
without it, and each step's logits are compared with the reference run on the whole sequence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from mm_megatron.config import ModelConfig
from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsForCausalLM

Tensor = torch.Tensor
Reference = Callable[[Tensor], Tensor]
DECODE_TOKENS = 24  # greedy steps of the generate() parity (uncached steps cost O(T) each)


class ParityError(AssertionError):
    """The converted model's logits differ from the reference beyond tolerance."""


@dataclass
class DecodeParity:
    """Figures of greedy decoding through ``generate`` against the reference."""

    new_tokens: int  # tokens decoded after the prompt
    cached_max_abs_diff: float  # max |Δ| of the step logits with the cache vs the reference
    uncached_max_abs_diff: float  # the same with use_cache=False
    same_tokens: bool  # cached and uncached generate chose the same tokens


def _greedy(
    model: torch.nn.Module,
    prompt: Tensor,
    new_tokens: int,
    use_cache: bool,
) -> tuple[Tensor, Tensor]:
    """Greedy tokens ``[1, T + new]`` and the step logits ``[1, new, V]`` from generate."""
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits, 1).float().cpu()


def _step_diff(reference: Reference, seq: Tensor, logits: Tensor, prompt_len: int) -> float:
    """max |Δ| between generate's step logits and the reference's logits of the same tokens."""
    ref = reference(seq[:, :-1]).float().cpu()[:, prompt_len - 1 :]
    return (ref - logits).abs().max().item()


@torch.no_grad()
def decode_parity(
    model: torch.nn.Module, reference: Reference, prompt: Tensor, new_tokens: int
) -> DecodeParity:
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


@dataclass
class ParityReport:
    """Figures of one parity check (logits of the converted model vs the reference)."""

    max_abs_diff: float  # max |logit difference| over the prompt, full forward
    max_kl: float  # max over positions of KL(reference || converted), nats
    mean_kl: float
    cached_max_abs_diff: float | None  # greedy generate() with the cache: step logits vs reference
    prompt_length: int
    decode: DecodeParity | None = None  # greedy decoding through generate(), cache on and off

    def __str__(self) -> str:
        cached = (
            ""
            if self.decode is None
            else (
                f", generate() over {self.decode.new_tokens} tokens max|Δ| "
                f"{self.decode.cached_max_abs_diff:.3e} (cache) "
                f"{self.decode.uncached_max_abs_diff:.3e} (no cache)"
            )
        )
        return (
            f"parity on {self.prompt_length} tokens: max|Δlogit| {self.max_abs_diff:.3e}, "
            f"KL(ref||hf) max {self.max_kl:.3e} mean {self.mean_kl:.3e}{cached}"
        )


def default_prompt(cfg: ModelConfig, length: int | None = None) -> Tensor:
    """A fixed prompt ``[1, T]`` (seeded random ids) long enough to cross h and m."""
    if length is None:
        length = 48 if cfg.arch != "mm" else cfg.stm_max_lag + cfg.ltm_offset_inference + 16
        length = min(length, cfg.seq_length)
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (1, length), generator=g)


def hf_model_class(model_type: str | None) -> type:
    """The class of an exported ``config.json``'s ``model_type``."""
    if model_type == "memory_mosaics":
        return MemoryMosaicsForCausalLM
    if model_type == "llama":
        return LlamaForCausalLM
    raise ValueError(f"model_type {model_type!r} is neither memory_mosaics nor llama")


def load_hf_model(model_dir: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The exported model of ``model_dir`` in fp32, eval mode, on ``device`` (the in-package
    copy of the MM v2 code, not the directory's remote code)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    cls = hf_model_class(config.get("model_type"))
    return cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def hf_logits(model: torch.nn.Module) -> Reference:
    """A HF causal LM as a logits function (full forward, no cache)."""
    return lambda tokens: model(tokens, use_cache=False).logits


@torch.no_grad()
def logit_parity(reference: Reference, candidate: Reference, prompt: Tensor) -> ParityReport:
    """Max |logit difference| and KL(reference || candidate) per position on ``prompt``."""
    ref, got = reference(prompt).float().cpu(), candidate(prompt).float().cpu()
    logp_ref, logp_got = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_got)).sum(-1)
    return ParityReport(
        max_abs_diff=(got - ref).abs().max().item(),
        max_kl=kl.max().item(),
        mean_kl=kl.mean().item(),
        cached_max_abs_diff=None,
        prompt_length=prompt.shape[1],
    )


def _enforce(
    report: ParityReport, worst: float, max_abs_tol: float, kl_tol: float, what: str
) -> None:
    if not (worst <= max_abs_tol and report.max_kl <= kl_tol):  # NaN fails too
        raise ParityError(f"{what}: {report} (tolerances: max|Δ| {max_abs_tol:g}, KL {kl_tol:g})")


def compare_logits(
    reference: Reference, candidate: Reference, prompt: Tensor, max_abs_tol: float, kl_tol: float
) -> ParityReport:
    """:func:`logit_parity`; raises :class:`ParityError` with the figures when out of
    tolerance."""
    report = logit_parity(reference, candidate, prompt)
    _enforce(
        report, report.max_abs_diff, max_abs_tol, kl_tol, "converted model differs from the source"
    )
    return report


@torch.no_grad()
def check_parity(
    model_dir: str | Path,
    reference: Reference,
    prompt: Tensor,
    *,
    max_abs_tol: float = 1e-3,
    kl_tol: float = 1e-5,
    cached: bool = True,
    device: str = "cpu",
) -> ParityReport:
    """Compare the exported model in ``model_dir`` (loaded in fp32) with ``reference``.

    :func:`logit_parity` on ``prompt`` ``[1, T]``; with ``cached``, greedy decoding through
    ``model.generate`` (the first half of the prompt, then up to :data:`DECODE_TOKENS` new
    tokens), with the cache and without, each step's logits against the reference
    (:func:`decode_parity`). Raises :class:`ParityError` with the figures when a figure
    exceeds its tolerance or cached and uncached decoding chose different tokens.
    """
    model = load_hf_model(model_dir, device)
    prompt = prompt.to(device)
    report = logit_parity(reference, hf_logits(model), prompt)
    worst = report.max_abs_diff
    if cached:
        split = max(1, prompt.shape[1] // 2)
        new = min(prompt.shape[1] - split, DECODE_TOKENS)
        report.decode = decode_parity(model, reference, prompt[:, :split], new)
        report.cached_max_abs_diff = report.decode.cached_max_abs_diff
        worst = max(worst, report.decode.cached_max_abs_diff, report.decode.uncached_max_abs_diff)
        if not report.decode.same_tokens:
            worst = math.inf  # cached and uncached generate() disagree: never publish
    _enforce(report, worst, max_abs_tol, kl_tol, "exported model differs from the reference")
    return report
