"""Run megatron-core 0.16.1 on machines without CUDA (CPU tensors, gloo backend).

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths:
the model-parallel RNG tracker reads ``torch.cuda`` RNG state, buffers are allocated on
``torch.cuda.current_device()``, the pipeline schedules and the optimizer create small
tensors with a hard-coded ``device="cuda"``, p2p calls ``torch.cuda.synchronize()``, the
grad-clip helper asserts ``param.grad.type() == 'torch.cuda.FloatTensor'`` and the
distributed optimizer checks ``param.type()`` strings. :func:`enable_cpu_mode` redirects
exactly those to the CPU, once per process, and only when CUDA is absent; on a GPU machine it
does nothing. Tests, the CPU demo and the training loop all call it before building models.

Our own modules (``mm_megatron.layers``) never call ``torch.cuda``: they take their device
from their inputs, so they need none of this.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_ENABLED = False
_FACTORIES = (
    "tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "as_tensor",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
)


def cpu_mode_enabled() -> bool:
    """True once :func:`enable_cpu_mode` has patched this process."""
    return _ENABLED


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_device(func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)

    return wrapper


def _patch_torch_devices() -> None:
    """Map ``device="cuda"`` (and CUDA indices) in tensor factories and ``.to``/``.cuda`` to CPU."""
    # ``with torch.device(...)`` recognises factory calls by the functions it lists (cached on
    # first use); list the original ones before wrapping them, or meta/device contexts break.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _cpu_device(getattr(torch, name)))

    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    original_to = torch.Tensor.to

    @functools.wraps(original_to)
    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and _is_cuda_device(args[0]):
            args = ("cpu", *args[1:])
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to  # type: ignore[method-assign]

    # The distributed optimizer accepts only parameters whose type() names a CUDA tensor.
    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch."):
            if not result.startswith("torch.cuda."):
                return "torch.cuda." + result[len("torch.") :]
        return result

    torch.Tensor.type = type_  # type: ignore[method-assign]

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 0  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)  # type: ignore
    # The model-parallel RNG tracker seeds and forks "the CUDA generator": use the CPU one.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: keep that one a no-op.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)  # type: ignore
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None  # type: ignore[assignment]


def _patch_megatron() -> None:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.tensor_parallel import random as tp_random

    def get_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> Any:
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    tp_random._get_cuda_rng_state = get_rng_state
    tp_random._set_cuda_rng_state = set_rng_state

    def get_tensor(
        self: Any, tensor_shape: Any, dtype: torch.dtype, name: str, mem_alloc_context: Any = None
    ) -> torch.Tensor:
        numel = 1
        for size in tensor_shape:
            numel *= size
        key = (name, dtype)
        if key not in self.buffer or self.buffer[key].numel() < numel:
            self.buffer[key] = torch.empty(numel, dtype=dtype)
        return self.buffer[key][:numel].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor

    def clip_grad_by_total_norm_fp32(
        parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
    ) -> None:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff >= 1.0:
            return
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is not None:
                grad.detach().mul_(coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def enable_cpu_mode() -> bool:
    """Patch this process so megatron-core runs on CPU. Idempotent.

    Does nothing (and returns False) when CUDA is available. Call it before building models,
    optimizers or pipeline schedules.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_devices()
    _patch_megatron()
    _ENABLED = True
    return True
