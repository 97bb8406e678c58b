"""GPU performance switches: which Megatron fusions and overlaps a run uses, and why.

:func:`plan` resolves the ``runtime`` switches of a config against this machine (CUDA,
Transformer Engine, apex) into a :class:`PerfPlan`. A switch left null follows
``runtime.fusions`` (``auto``: on where supported, ``off``: off); a switch forced ``true``
on a machine that cannot run it is a :class:`ConfigError` naming the key and what is
missing. :func:`check_layout` holds the checks that depend only on the config (run at load).

What each switch needs, and why:

* ``gradient_accumulation_fusion``: CUDA and apex's ``fused_weight_gradient_mlp_cuda``
  (Megatron's output layer is a local linear even under TE, and it needs the extension).
* ``bias_swiglu_fusion``: nothing (Megatron's fused SwiGLU is torch-compiled); auto turns it
  on with CUDA only, as Inductor takes minutes to compile it for the CPU.
* ``norm_linear_fusion``: the Transformer Engine backend (CUDA and the TE package).
* ``overlap_param_gather``: the distributed optimizer and ``overlap_grad_reduce``; auto turns
  it on with CUDA. It runs on CPU/gloo too (tested there). ``align_param_gather`` follows it
  when the pipeline has more than one stage.
* ``tp_comm_overlap``: CUDA, the TE backend, TP >= 2 and sequence parallelism.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mm_megatron.config_loading import ConfigError
from mm_megatron.specs import resolve_backend, transformer_engine_available
from pretrain.config import Config

SWITCHES = (
    "gradient_accumulation_fusion",
    "bias_swiglu_fusion",
    "norm_linear_fusion",
    "overlap_param_gather",
    "tp_comm_overlap",
)


@dataclass(frozen=True)
class Machine:
    """What this process can use (detected by default; tests pass their own)."""

    cuda: bool
    te: bool
    apex_wgrad: bool

    @classmethod
    def detect(cls) -> Machine:
        return cls(
            cuda=torch.cuda.is_available(),
            te=transformer_engine_available(),
            apex_wgrad=importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
        )


@dataclass
class PerfPlan:
    """The resolved switches, and one line per switch saying what was decided and why."""

    gradient_accumulation_fusion: bool = False
    bias_swiglu_fusion: bool = False
    norm_linear_fusion: bool = False
    overlap_param_gather: bool = False
    align_param_gather: bool = False
    tp_comm_overlap: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "performance switches:\n" + "\n".join(f"  {note}" for note in self.notes)


def check_layout(cfg: Config) -> None:
    """Config-only checks of the forced switches (hardware is checked by :func:`plan`)."""
    r, p = cfg.runtime, cfg.parallel
    if r.overlap_param_gather:
        if not p.use_distributed_optimizer:
            raise ConfigError(
                "runtime.overlap_param_gather: needs parallel.use_distributed_optimizer: true"
            )
        if not p.overlap_grad_reduce:
            raise ConfigError(
                "runtime.overlap_param_gather: needs parallel.overlap_grad_reduce: true"
            )
    if r.tp_comm_overlap and not (p.tensor_model_parallel_size >= 2 and p.sequence_parallel):
        raise ConfigError(
            "runtime.tp_comm_overlap: needs parallel.tensor_model_parallel_size >= 2 and "
            "parallel.sequence_parallel: true"
        )


def _missing(name: str, cfg: Config, machine: Machine, te_backend: bool) -> str | None:
    """What ``name`` lacks on this machine and config (None: it can run)."""
    p = cfg.parallel
    if name == "gradient_accumulation_fusion":
        if not machine.cuda:
            return "CUDA (no GPU here)"
        if not machine.apex_wgrad:
            return "apex's fused_weight_gradient_mlp_cuda extension (install NVIDIA apex)"
    elif name == "norm_linear_fusion":
        if not te_backend:
            return (
                "the Transformer Engine backend (CUDA, the transformer-engine package and "
                "model.backend auto or transformer_engine)"
            )
        if cfg.model.arch != "mm":
            return "model.arch mm (the TE baseline always fuses its norms)"
    elif name == "overlap_param_gather":
        if not (p.use_distributed_optimizer and p.overlap_grad_reduce):
            return "parallel.use_distributed_optimizer and parallel.overlap_grad_reduce"
    elif name == "tp_comm_overlap":
        if not machine.cuda:
            return "CUDA (no GPU here)"
        if not te_backend:
            return "the Transformer Engine backend with userbuffers"
        if not (p.tensor_model_parallel_size >= 2 and p.sequence_parallel):
            return "tensor_model_parallel_size >= 2 with sequence_parallel"
    return None


def _auto_reason(name: str, machine: Machine) -> str | None:
    """Why auto leaves a runnable switch off (None: auto turns it on)."""
    if name in ("bias_swiglu_fusion", "overlap_param_gather") and not machine.cuda:
        return "no CUDA: no gain on CPU (force it with true)"
    return None


def plan(cfg: Config, machine: Machine | None = None) -> PerfPlan:
    """Resolve ``cfg.runtime``'s switches on ``machine`` (default: this process's)."""
    machine = machine or Machine.detect()
    backend = cfg.model.backend
    if backend == "auto":
        te_backend = machine.cuda and machine.te
    elif backend == "transformer_engine":
        te_backend = True
        if not (machine.cuda and machine.te):
            resolve_backend(backend)  # raises its explanatory error
    else:
        te_backend = False
    result = PerfPlan()
    for name in SWITCHES:
        forced = getattr(cfg.runtime, name)
        missing = _missing(name, cfg, machine, te_backend)
        if forced is True and missing:
            raise ConfigError(
                f"runtime.{name}: forced on, but this run lacks {missing}; "
                f"set runtime.{name}: null (auto) or false"
            )
        if forced is not None:
            on, why = forced, "set in the config"
        elif cfg.runtime.fusions == "off":
            on, why = False, "runtime.fusions: off"
        elif missing:
            on, why = False, f"needs {missing}"
        else:
            reason = _auto_reason(name, machine)
            on, why = reason is None, reason or "supported here"
        setattr(result, name, on)
        result.notes.append(f"{name}: {'on' if on else 'off'} ({why})")
    if result.overlap_param_gather and cfg.parallel.pipeline_model_parallel_size > 1:
        result.align_param_gather = True
        result.notes.append("align_param_gather: on (follows overlap_param_gather with PP > 1)")
    return result


def transformer_config_overrides(perf: PerfPlan) -> dict[str, Any]:
    """The ``TransformerConfig`` fields the plan sets."""
    return dict(
        gradient_accumulation_fusion=perf.gradient_accumulation_fusion,
        bias_activation_fusion=perf.bias_swiglu_fusion,
        tp_comm_overlap=perf.tp_comm_overlap,
    )


def initialize_tp_comm_overlap(cfg: Config, dtype: torch.dtype) -> None:  # pragma: no cover
    """Allocate TE's userbuffers for TP comm overlap (as Megatron-LM does); GPU + TE only."""
    from transformer_engine.pytorch.module import base as te_base

    shape = [cfg.model.seq_length * cfg.train.micro_batch_size, cfg.model.hidden_size]
    te_base.initialize_ub(
        shape=shape, tp_size=cfg.parallel.tensor_model_parallel_size, use_fp8=False, dtype=dtype
    )


@contextlib.contextmanager
def params_synced(model: list[Any]) -> Iterator[None]:
    """With ``overlap_param_gather``, parameters are all-gathered lazily in the next forward;
    inside this block they are complete (for checkpoints and validation), as in Megatron-LM."""
    chunks = [c for c in model if getattr(c, "use_forward_hook", False)]
    for chunk in chunks:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in chunks:
            chunk.enable_forward_pre_hook()


def param_sync_funcs(model: list[Any]) -> Callable | list[Callable]:
    """``TransformerConfig.param_sync_func`` for aligned parameter all-gathers."""
    funcs = [chunk.start_param_sync for chunk in model]
    return funcs[0] if len(funcs) == 1 else funcs
