"""Periodic validation loss by position during training (``logging.position_loss_*``).

Every ``logging.position_loss_interval`` iterations the model in training evaluates the first
``position_loss_sequences`` validation documents that hold ``position_loss_length + 1``
tokens (by default four times the training length) and logs the mean loss of each bucket of
``position_loss_bucket`` positions: TensorBoard scalars ``position_loss/<first>-<last>``,
``position_loss/within_train_length`` and ``position_loss/beyond_train_length``, and one
stdout line. A model that extrapolates keeps its loss flat past ``model.seq_length``; the
offline suite with the same figures is :mod:`mm_megatron.eval.position_loss`.

The evaluation goes through Megatron's pipeline schedules (forward only, one document per
micro-batch, MM v2 at its inference m), so it works under any TP/PP/VPP/SP layout; every
data-parallel replica evaluates the same documents. The documents are read once, at the
first call, which fails with a ConfigError when none is long enough.
"""

from __future__ import annotations

import functools
import math
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mm_megatron.config_loading import ConfigError
from mm_megatron.layers.memories import set_ltm_offset
from mm_megatron.model import document_causal_mask

Tensor = torch.Tensor


def source_prefix(cfg: Any) -> str:
    """The dataset the documents come from: the first prefix of the validation blend, or of
    the training blend when there is none."""
    blend = cfg.data.valid_blend or cfg.data.train_blend
    prefixes = [item for item in blend if isinstance(item, str)]
    if not prefixes:
        raise ConfigError("logging.position_loss_interval: no dataset prefix in the blends")
    return prefixes[0]


@functools.cache
def _documents(prefix: str, length: int, count: int) -> Tensor:
    from mm_megatron.eval.position_loss import load_sequences

    try:
        return load_sequences(prefix, length, count)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"logging.position_loss_length: {err}") from None


def _forward_step(arch: str, bucket: int, data_iterator: Any, model: Any) -> tuple:
    batch = next(data_iterator)
    doc_pos = batch["doc_pos"]
    mask = None if arch == "mm" else document_causal_mask(doc_pos)
    output = model(batch["tokens"], doc_pos, mask, labels=batch["labels"])
    return output, partial(_bucket_sums, bucket)


def _bucket_sums(bucket: int, output: Tensor) -> tuple:
    """Per-token losses ``[b, s]`` → (sum, count, {"position": [bucket sums ‖ counts]})."""
    per_pos = output.float().sum(0)
    n = math.ceil(per_pos.shape[0] / bucket)
    padded = per_pos.new_zeros(n * bucket)
    padded[: per_pos.shape[0]] = per_pos
    counts = per_pos.new_zeros(n * bucket)
    counts[: per_pos.shape[0]] = output.shape[0]
    sums, counts = padded.view(n, bucket).sum(1), counts.view(n, bucket).sum(1)
    num_tokens = torch.tensor(output.numel(), dtype=torch.int, device=output.device)
    return per_pos.sum(), num_tokens, {"position": torch.cat([sums, counts]).detach()}


@torch.no_grad()
def position_losses(cfg: Any, model: list[Any], sequences: Tensor, bucket: int) -> Tensor:
    """Mean loss per bucket (``[ceil(L / bucket)]``, on every rank) of ``sequences``
    ``[N, L + 1]``, run through the forward-only pipeline schedule."""
    device = next(model[0].parameters()).device
    length = sequences.shape[1] - 1
    pos = torch.arange(length, device=device)[None]
    batches = [
        {"tokens": s[None, :-1].to(device), "labels": s[None, 1:].to(device), "doc_pos": pos}
        for s in sequences
    ]
    iterators = [iter(batches) for _ in model]
    n = math.ceil(length / bucket)
    for chunk in model:
        chunk.eval()
        set_ltm_offset(chunk, None)
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, cfg.model.arch, bucket),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=model if len(model) > 1 else model[0],
            num_microbatches=len(batches),
            seq_length=length,
            micro_batch_size=1,
            forward_only=True,
        )
    finally:
        for chunk in model:
            chunk.train()
    total = torch.zeros(2 * n, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in outputs:
            total += item["position"].to(torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[:n] / total[n:].clamp_min(1)).cpu()


def log_position_loss(cfg: Any, model: list[Any], iteration: int, writer: Any) -> None:
    """The training loop's hook, called after every iteration: reads the documents at the
    first call (ConfigError if none is long enough) and evaluates and logs every
    ``logging.position_loss_interval`` iterations (``writer``: the TensorBoard writer of
    rank 0, or None). Does nothing when the option is off."""
    interval = cfg.logging.position_loss_interval
    if not interval:
        return
    length, bucket = cfg.position_loss_length, cfg.position_loss_bucket
    sequences = _documents(source_prefix(cfg), length, cfg.logging.position_loss_sequences)
    if iteration % interval:
        return
    means = position_losses(cfg, model, sequences, bucket)
    if dist.get_rank() != 0:
        return
    train = cfg.model.seq_length
    scalars = {
        f"position_loss/{b * bucket:05d}-{min((b + 1) * bucket, length) - 1:05d}": means[b].item()
        for b in range(len(means))
    }
    starts = torch.arange(len(means)) * bucket
    sizes = (torch.clamp(starts + bucket, max=length) - starts).double()
    inside, beyond = starts < train, starts >= train
    if inside.any() and beyond.any():  # buckets wholly beyond the training length
        for name, sel in (("within_train_length", inside), ("beyond_train_length", beyond)):
            scalars[f"position_loss/{name}"] = float(
                (means.double()[sel] * sizes[sel]).sum() / sizes[sel].sum()
            )
    parts = [f"{k.split('/')[1]} {v:.3f}" for k, v in scalars.items()]
    print(
        f"position loss at step {iteration} ({len(sequences)} documents of {length}, trained "
        f"at {train}): " + " | ".join(parts),
        flush=True,
    )
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, iteration)
        writer.flush()
