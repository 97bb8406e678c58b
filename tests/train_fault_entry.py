"""Test-only entry point: pretrain/pretrain_mm.py with a bad batch injected at the steps
listed in ``MM_TEST_NAN_STEPS`` (comma-separated): their loss and every gradient are NaN."""

from __future__ import annotations

import os
import sys
from typing import Any

from pretrain import pretrain_mm, steps, trainer

BAD = {int(x) for x in os.environ.get("MM_TEST_NAN_STEPS", "").split(",") if x}
_train_step = steps.train_step


def train_step(
    cfg: Any,
    model: list[Any],
    optimizer: Any,
    scheduler: Any,
    iterators: list[Any],
    num_microbatches: int,
    iteration: int,
) -> dict[str, float]:
    """The real step, with the gradients and loss of a listed step replaced by NaN."""
    if iteration not in BAD:
        return _train_step(cfg, model, optimizer, scheduler, iterators, num_microbatches, iteration)
    real = steps.run_microbatches

    def poisoned(*args: Any, **kwargs: Any) -> tuple[float, float]:
        _, tokens = real(*args, **kwargs)
        for chunk in model:
            for buffer in chunk.buffers:
                buffer.grad_data.fill_(float("nan"))
        return float("nan"), tokens

    steps.run_microbatches = poisoned
    try:
        return _train_step(cfg, model, optimizer, scheduler, iterators, num_microbatches, iteration)
    finally:
        steps.run_microbatches = real


trainer.train_step = train_step

if __name__ == "__main__":
    sys.exit(pretrain_mm.main())
