"""Tiny MM v2 models and one training-step computation shared by the model tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mm_megatron.config import ModelConfig, ParallelConfig

VOCAB = 64  # a multiple of make_vocab_size_divisible_by x TP: no padded logits


def tiny_config(**overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = dict(
        arch="mm",
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        ffn_hidden_size=48,
        vocab_size=VOCAB,
        seq_length=24,
        make_vocab_size_divisible_by=16,
        short_window=8,
        ltm_offset_min=3,
        ltm_offset_max=6,
        ltm_offset_inference=3,
        scan_chunk_size=8,
        memory_backend="dense",
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def batch(cfg: ModelConfig, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens with a few packed documents per row (including one of length 1)."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, s + 1), generator=g)
    rows = []
    for _ in range(batch_size):
        cuts = sorted({0, *torch.randint(1, s, (3,), generator=g).tolist(), 7, 8})
        lengths = [e - a for a, e in zip(cuts, cuts[1:] + [s], strict=True)]
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "doc_pos": torch.stack(rows)}


def reference_loss_and_grads(ref: torch.nn.Module, data: dict[str, torch.Tensor]):
    ref.zero_grad()
    logits = ref(data["tokens"], data["doc_pos"])
    loss = F.cross_entropy(logits.flatten(0, 1), data["labels"].flatten())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in ref.named_parameters()}


def init_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """The trainer's parallel groups and seeds for ``parallel``."""
    from mm_megatron.model import init_model_parallel

    init_model_parallel(parallel, seed)


def build_stage(
    cfg: ModelConfig, parallel: ParallelConfig, **config_overrides: Any
) -> tuple[torch.nn.Module, Any]:
    """This rank's pipeline stage of the Megatron model and its TransformerConfig
    (``config_overrides``: extra TransformerConfig fields, e.g. recompute settings), built as
    the trainer builds a stage, without DDP (parameter names as in a full state dict)."""
    from mm_megatron.model import build_stage as build_model_stage
    from mm_megatron.model import transformer_config

    config = transformer_config(cfg, parallel, **config_overrides)
    return build_model_stage(cfg, config), config


def megatron_loss_and_grads(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    full_state: dict[str, torch.Tensor],
    microbatches: list[dict[str, torch.Tensor]],
    ltm_offset: int | None = None,
    **config_overrides: Any,
) -> tuple[float, dict[str, torch.Tensor], torch.nn.Module, Any]:
    """Build this rank's stage, load ``full_state``, run the pipeline schedule over the
    microbatches (mean token loss), and return the mean loss and the full gradients."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mm_megatron.layers.memories import set_ltm_offset
    from mm_megatron.parallel_layout import gather_full_tensors, load_full_state_dict

    model, config = build_stage(cfg, parallel, **config_overrides)
    load_full_state_dict(model, full_state, config)
    set_ltm_offset(model, ltm_offset)
    model.zero_grad()
    config.grad_scale_func = None

    def loss_func(output: torch.Tensor):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule scales loss in place

    def forward_step(iterator, module):
        data = next(iterator)
        out = module(data["tokens"], data["doc_pos"], None, labels=data["labels"])
        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model,
        num_microbatches=len(microbatches),
        seq_length=cfg.seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=False,
    )
    if parallel.sequence_parallel or parallel.tensor_model_parallel_size > 1:
        _allreduce_sequence_parallel_grads(model, parallel)
    grads = {n: p.grad for n, p in model.named_parameters()}
    full_grads = gather_full_tensors(model, grads, config)
    loss = torch.tensor(
        sum(x["loss"].item() for x in losses) / len(microbatches) if losses else 0.0
    )
    if parallel.pipeline_model_parallel_size > 1:
        torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    return loss.item(), full_grads, model, config


def _allreduce_sequence_parallel_grads(model: torch.nn.Module, parallel: ParallelConfig) -> None:
    """What finalize_model_grads does for SP: sum the partial grads of replicated params."""
    from megatron.core import parallel_state

    if not parallel.sequence_parallel:
        return
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(
                param.grad, group=parallel_state.get_tensor_model_parallel_group()
            )


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for name, g in want.items():
        try:
            torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None
