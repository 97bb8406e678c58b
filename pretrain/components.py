"""Build what a run trains: the parallel groups, model chunks (one per virtual pipeline stage)
wrapped in Megatron's DDP, the Megatron optimizer (optionally distributed) and its LR schedule;
:class:`Components` holds them, built once (the trainer, the benchmarks and the tests share it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.transformer import TransformerConfig

from mm_megatron.memory_math import HEAD_SCALARS
from mm_megatron.model import build_stage, transformer_config
from pretrain import perf
from pretrain.config import Config


def params_dtype(cfg: Config) -> torch.dtype:
    """The parameters' dtype: ``train.precision``, with ``auto`` bf16 on a GPU, else fp32."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def configure_compile() -> None:
    """Make a recompile-limit hit an error, not a silent fallback to eager.

    Past dynamo's recompile limit a compiled function runs uncompiled; for the memories'
    FlexAttention that is the eager path, which materialises the ``[B, H, T, T]`` scores (out
    of memory at long context, slow otherwise). The memory kernels compile once per grad
    mode (see :mod:`mm_megatron.ops.memory_masks`), so hitting the limit means a bug.
    """
    import torch._dynamo

    torch._dynamo.config.fail_on_recompile_limit_hit = True


def make_transformer_config(cfg: Config, log: bool = True) -> TransformerConfig:
    """Megatron's config for this run: precision, recompute and the performance switches
    (resolved on this machine by :func:`pretrain.perf.plan`, logged on rank 0)."""
    plan = perf.plan(cfg)
    if log and (not dist.is_initialized() or dist.get_rank() == 0):
        print(plan.summary(), flush=True)
    extra: dict[str, Any] = dict(
        calculate_per_token_loss=True,
        batch_p2p_comm=cfg.parallel.batch_p2p_comm,
        overlap_p2p_comm=cfg.parallel.overlap_p2p_comm,
        **perf.transformer_config_overrides(plan),
    )
    if cfg.train.recompute == "full":
        extra.update(
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=cfg.train.recompute_num_layers,
        )
    elif cfg.train.recompute == "selective":  # the memory core / core attention
        extra.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    return transformer_config(cfg.model, cfg.parallel, params_dtype=params_dtype(cfg), **extra)


def build_model_chunks(cfg: Config, config: TransformerConfig, device: torch.device) -> list[Any]:
    """This rank's model chunks, on ``device``, wrapped in Megatron's DDP."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    plan = perf.plan(cfg)
    if plan.tp_comm_overlap:  # pragma: no cover - GPU + TE only
        perf.initialize_tp_comm_overlap(cfg, config.params_dtype)
    chunks = []
    for vp in range(vpp or 1):
        module = build_stage(
            cfg.model,
            config,
            vp if vpp else None,
            init_seed=cfg.train.seed,
            fuse_norm_linear=plan.norm_linear_fusion,
        )
        chunks.append(module.to(device))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=plan.overlap_param_gather,
        align_param_gather=plan.align_param_gather,
    )
    return [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]


def _no_weight_decay(param: torch.nn.Parameter, name: str) -> bool:
    """Norm gains, biases and the per-head scalars (β₀, β₁, α, γ, α_ψ) get no weight decay."""
    return param.dim() == 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in HEAD_SCALARS


def build_optimizer(cfg: Config, model: list[Any], config: TransformerConfig) -> tuple[Any, Any]:
    """The Megatron optimizer over ``model`` (no weight decay on norms, biases and the
    per-head scalars) and its LR/WD schedule; ``config`` is only read (precision)."""
    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.final_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    overrides = {
        ParamKey(
            with_name_predicate=ParamWithNamePredicate("no_wd", _no_weight_decay)
        ): ParamGroupOverride(wd_mult=0.0)
    }
    optimizer = get_megatron_optimizer(opt_config, model, config_overrides=overrides)
    iters = cfg.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.final_lr,
        lr_warmup_steps=o.warmup_iters,
        lr_decay_steps=iters,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def schedule_hooks(model: list[Any], optimizer: Any) -> dict[str, Any]:
    """The TransformerConfig fields through which Megatron's pipeline schedule reaches DDP and
    the optimizer: gradient finalisation (DP all-reduce), loss scaling, the no-sync context of
    each chunk and, under ``align_param_gather``, one parameter all-gather for all stages (as
    Megatron-LM). They exist only once the model and optimizer do; :meth:`Components.build`
    sets them on the config the chunks share."""
    no_sync = [chunk.no_sync for chunk in model]
    hooks: dict[str, Any] = dict(
        finalize_model_grads_func=finalize_model_grads,
        grad_scale_func=optimizer.scale_loss,
        no_sync_func=no_sync[0] if len(no_sync) == 1 else no_sync,
    )
    if model[0].ddp_config.align_param_gather:
        hooks["param_sync_func"] = perf.param_sync_funcs(model)
    return hooks


@dataclass
class Components:
    """What a training step needs, built once: Megatron's TransformerConfig (shared by the
    chunks), this rank's DDP-wrapped model chunks, the optimizer and its LR schedule.

    Used by the trainer (:class:`pretrain.trainer.Trainer`), the throughput benchmarks and
    the tests alike; a step is ``pretrain.steps.train_step(cfg, c.model, c.optimizer,
    c.scheduler, ...)``. The parallel groups must exist (:func:`init_model_parallel`).
    """

    config: TransformerConfig
    model: list[Any]
    optimizer: Any
    scheduler: Any

    @classmethod
    def build(cls, cfg: Config, device: torch.device, log: bool = True) -> Components:
        """Build the config, chunks, optimizer and schedule for ``cfg`` on ``device``, then
        connect the schedule hooks (``log``: print the performance switches on rank 0)."""
        config = make_transformer_config(cfg, log=log)
        model = build_model_chunks(cfg, config, device)
        optimizer, scheduler = build_optimizer(cfg, model, config)
        for name, value in schedule_hooks(model, optimizer).items():
            setattr(config, name, value)  # the one change to the config after it is built
        return cls(config, model, optimizer, scheduler)
