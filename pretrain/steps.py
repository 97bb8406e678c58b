"""One training or evaluation step through Megatron's pipeline schedules."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mm_megatron.layers.memories import set_ltm_offset
from mm_megatron.model import document_causal_mask
from mm_megatron.packed import packed_seq_params, uses_packed_sequences
from pretrain.bad_batches import grads_finite
from pretrain.config import Config
from pretrain.perf import params_synced


def ltm_offset_for_step(cfg: Config, iteration: int) -> int:
    """m ~ U[ltm_offset_min, ltm_offset_max] (paper §4, "Stochastic long-term memory size"),
    drawn per optimiser step from a generator seeded by (seed, iteration): identical on every
    rank and after a resume (the paper leaves the granularity of the draw open)."""
    rng = np.random.default_rng([cfg.train.seed, iteration])
    return int(rng.integers(cfg.model.ltm_offset_min, cfg.model.ltm_offset_max + 1))


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple:
    """Per-token loss: (sum, token count, report) as Megatron's schedules expect."""
    losses = output.float() * loss_mask.reshape(output.shape)  # [1, b*s] when packed
    loss_sum = losses.sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def _forward_step(arch: str, packed: bool, data_iterator: Any, model: Any) -> tuple:
    batch = next(data_iterator)
    doc_pos = batch["doc_pos"]
    if arch == "mm":  # the memories build their masks from doc_pos
        output = model(batch["tokens"], doc_pos, None, labels=batch["labels"])
    elif packed:  # TE: the rows packed into one THD sequence, documents by cu_seqlens
        output = model(
            batch["tokens"].reshape(1, -1),
            doc_pos.reshape(1, -1),
            None,
            labels=batch["labels"].reshape(1, -1),
            packed_seq_params=packed_seq_params(doc_pos),
        )
    else:
        output = model(
            batch["tokens"], doc_pos, document_causal_mask(doc_pos), labels=batch["labels"]
        )
    return output, partial(_loss_func, batch["loss_mask"])


def run_microbatches(
    cfg: Config,
    model: list[Any],
    iterators: list[Any],
    num_microbatches: int,
    forward_only: bool,
) -> tuple[float, float]:
    """Forward (and backward) over the micro-batches of one global batch.

    Returns (mean token loss, token count) on every rank: the last pipeline stage's sums are
    reduced over data-parallel ranks and shared with the other stages.
    """
    packed = uses_packed_sequences(cfg.model)
    mbs, seq = cfg.train.micro_batch_size, cfg.model.seq_length
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, cfg.model.arch, packed),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq * mbs if packed else seq,  # packed: one row of b*s tokens
        micro_batch_size=1 if packed else mbs,
        forward_only=forward_only,
    )
    device = next(model[0].parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            total += item["lm loss"].to(torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp_min(1)).item(), total[1].item()


def train_step(
    cfg: Config,
    model: list[Any],
    optimizer: Any,
    scheduler: Any,
    iterators: list[Any],
    num_microbatches: int,
    iteration: int,
) -> dict[str, float]:
    """One optimiser step; ``iteration`` is the 1-based index of the step being taken."""
    m = ltm_offset_for_step(cfg, iteration) if cfg.model.arch == "mm" else 0
    for chunk in model:
        chunk.train()
        set_ltm_offset(chunk, m if cfg.model.arch == "mm" else None)
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss, tokens = run_microbatches(cfg, model, iterators, num_microbatches, forward_only=False)
    if cfg.train.skip_bad_batches and not grads_finite(loss, model):
        return {
            "loss": loss,
            "tokens": tokens,
            "grad_norm": float("nan"),
            "lr": optimizer.param_groups[0]["lr"],
            "loss_scale": float(optimizer.get_loss_scale()),
            "ltm_offset": float(m),
            "update_skipped": 1.0,
            "bad_batch": 1.0,
        }
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    return {
        "loss": loss,
        "tokens": tokens,
        "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
        "lr": optimizer.param_groups[0]["lr"],
        "loss_scale": float(optimizer.get_loss_scale()),
        "ltm_offset": float(m),
        "update_skipped": float(not update_ok),
    }


@torch.no_grad()
def evaluate(cfg: Config, model: list[Any], iterators: list[Any], num_microbatches: int) -> float:
    """Mean validation loss over ``logging.eval_iters`` global batches, at the inference m."""
    for chunk in model:
        chunk.eval()
        set_ltm_offset(chunk, None)
    total, count = 0.0, 0.0
    with params_synced(model):  # complete parameters under overlap_param_gather
        for _ in range(cfg.logging.eval_iters):
            loss, tokens = run_microbatches(cfg, model, iterators, num_microbatches, True)
            total += loss * tokens
            count += tokens
    for chunk in model:
        chunk.train()
    return total / max(count, 1.0)
