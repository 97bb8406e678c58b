"""Table 6 initialisation for Megatron-Core linears (depth-scaled, clipped normals).

Megatron's MLP builds its linears with ``config.init_method``, one method for all layers.
Table 6 scales every matrix by its layer index, so the layer spec gives each linear class an
``init_std`` and these wrappers replace the ``init_method`` Megatron passes in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from mm_megatron.init_rules import table6_init_


def table6_init_method(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``init_method`` for Megatron: N(0, std) clipped to ±3·std."""
    return functools.partial(table6_init_, std=std)


@functools.cache
def depth_scaled(linear_cls: type) -> type:
    """Subclass of a Megatron linear class whose init uses ``init_std`` from its spec params."""

    class DepthScaled(linear_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, init_std: float, init_method: Any = None, **kwargs: Any):
            super().__init__(*args, init_method=table6_init_method(init_std), **kwargs)

    DepthScaled.__name__ = DepthScaled.__qualname__ = f"DepthScaled{linear_cls.__name__}"
    return DepthScaled
