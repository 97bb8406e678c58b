"""Resolution of the performance switches (pretrain/perf.py) and their config checks, on
simulated machines: what ``auto`` enables where, and the errors of forced switches."""

from __future__ import annotations

import pytest

from mm_megatron.config_loading import ConfigError
from pretrain.config import load_train_config
from pretrain.perf import Machine, plan

CPU = Machine(cuda=False, te=False, apex_wgrad=False)
GPU_TE_APEX = Machine(cuda=True, te=True, apex_wgrad=True)
GPU_BARE = Machine(cuda=True, te=False, apex_wgrad=False)
TINY = "pretrain/configs/tiny_mm.yaml"
DISTOPT = ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true"]
TP_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]


def _cfg(*overrides):
    return load_train_config(TINY, ["data.mock=true", "model.backend=auto", *overrides])


def test_auto_on_cpu_turns_everything_off_and_says_why():
    p = plan(_cfg(*DISTOPT), CPU)
    assert not any(
        [
            p.gradient_accumulation_fusion,
            p.bias_swiglu_fusion,
            p.norm_linear_fusion,
            p.overlap_param_gather,
            p.tp_comm_overlap,
        ]
    )
    text = p.summary()
    assert "gradient_accumulation_fusion: off (needs CUDA" in text
    assert "overlap_param_gather: off (no CUDA" in text


def test_auto_on_a_full_gpu_stack_turns_everything_on():
    p = plan(_cfg(*DISTOPT, *TP_SP, "parallel.pipeline_model_parallel_size=2"), GPU_TE_APEX)
    assert p.gradient_accumulation_fusion and p.bias_swiglu_fusion and p.norm_linear_fusion
    assert p.overlap_param_gather and p.align_param_gather and p.tp_comm_overlap


def test_auto_on_a_bare_gpu_keeps_what_needs_te_or_apex_off():
    p = plan(_cfg(*DISTOPT), GPU_BARE)
    assert p.bias_swiglu_fusion and p.overlap_param_gather and not p.align_param_gather
    assert not (p.gradient_accumulation_fusion or p.norm_linear_fusion or p.tp_comm_overlap)
    assert "apex" in p.summary() and "Transformer Engine" in p.summary()


def test_fusions_off_and_explicit_false_win():
    p = plan(_cfg(*DISTOPT, "runtime.fusions=off", "runtime.bias_swiglu_fusion=true"), GPU_TE_APEX)
    assert p.bias_swiglu_fusion and not p.gradient_accumulation_fusion
    assert _cfg("runtime.fusions='off'").runtime.fusions == "off"
    p = plan(_cfg("runtime.norm_linear_fusion=false"), GPU_TE_APEX)
    assert not p.norm_linear_fusion and p.gradient_accumulation_fusion


@pytest.mark.parametrize(
    "key, machine, missing",
    [
        ("gradient_accumulation_fusion", CPU, "CUDA"),
        ("gradient_accumulation_fusion", GPU_BARE, "fused_weight_gradient_mlp_cuda"),
        ("norm_linear_fusion", GPU_BARE, "Transformer Engine"),
        ("tp_comm_overlap", CPU, "CUDA"),
    ],
)
def test_forcing_an_unsupported_switch_names_the_key_and_what_is_missing(key, machine, missing):
    with pytest.raises(ConfigError, match=rf"runtime\.{key}: forced on.*{missing}"):
        plan(_cfg(f"runtime.{key}=true", *TP_SP), machine)


def test_switches_that_run_on_cpu_may_be_forced_there():
    p = plan(
        _cfg(*DISTOPT, "runtime.bias_swiglu_fusion=true", "runtime.overlap_param_gather=true"), CPU
    )
    assert p.bias_swiglu_fusion and p.overlap_param_gather


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["runtime.overlap_param_gather=true"], "needs parallel.use_distributed_optimizer"),
        (
            ["runtime.overlap_param_gather=true", "parallel.use_distributed_optimizer=true"],
            "needs parallel.overlap_grad_reduce",
        ),
        (["runtime.tp_comm_overlap=true"], "tensor_model_parallel_size >= 2"),
        (["runtime.fusions=on"], "fusions"),
        (["runtime.fusions=true"], "fusions: expected auto or off"),
        (["train.recompute=partial"], "recompute"),
        (["logging.profile.start_step=0"], "start_step: must be >= 1"),
        (["logging.profile.start_step=3", "logging.profile.end_step=2"], "end_step: must be >="),
        (["logging.profile.end_step=2"], "end_step: set start_step too"),
        (["logging.profile.start_step=1", "logging.dir=null"], "profile.dir: needed"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)
