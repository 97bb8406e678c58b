"""Per-layer MM v2 telemetry at low frequency (``logging.telemetry_interval``).

On a telemetry step, forward hooks on every MM v2 memories module record, for the first
micro-batch and per memory (short-term, long-term) and head:

* the bandwidth and value parameters β₀, β₁, α (Eq. 6), γ (Eq. 9) and α_ψ, as the model
  uses them (after the Table 6 reparameterisation);
* the key extractor's gate g = e^{W_g x} and decay λ = e^{-|W_λ x|} (Eq. 8), averaged over
  tokens;
* the memory's output norm ‖y‖ (STM against LTM), averaged over tokens;
* the share of empty memory rows: queries whose memory holds no pair yet (n = 0 in Eq. 6,
  e.g. the first m tokens of a document for the long-term memory).

Every rank records its own layers and heads; rank 0 gathers them (one collective on the
telemetry step only) and writes ``mm/layerNN/<memory>/<stat>`` scalars (the mean over
heads) and per-head histograms to TensorBoard (and W&B scalars when enabled). Nothing is
recorded, and no hook is installed, on other steps.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mm_megatron.memory_math import bandwidth_params, memory_span, value_scale
from mm_megatron.ops.naive import visible_pairs

PARAMS = ("beta0", "beta1", "alpha", "gamma", "alpha_psi")


def memory_modules(model: list[Any]) -> list[Any]:
    """The MM v2 memories modules of this rank's model chunks."""
    return [
        m
        for chunk in model
        for m in chunk.modules()
        if hasattr(m, "ltm_offset") and hasattr(m, "linear_in")
    ]


def _tag(module: Any, kind: str, stat: str) -> str:
    return f"mm/layer{module.layer_number:02d}/{kind}/{stat}"


def parameter_stats(module: Any) -> dict[str, list[float]]:
    """Per-head β₀, β₁, α, γ, α_ψ of each memory of ``module``."""
    out = {}
    with torch.no_grad():
        for i, kind in enumerate(module.kinds):
            b0, b1, alpha = bandwidth_params(
                module.beta0_raw[:, i], module.beta1_raw[:, i], module.alpha_raw[:, i]
            )
            values = {
                "beta0": b0,
                "beta1": b1,
                "alpha": alpha,
                "gamma": module.gamma[:, i].float(),
                "alpha_psi": value_scale(module.value_scale_raw[:, i]),
            }
            for name, value in values.items():
                out[_tag(module, kind, name)] = value.detach().cpu().tolist()
    return out


class Telemetry:
    """Arms hooks on telemetry steps and reports what they saw (see module docstring)."""

    def __init__(self, interval: int | None, model: list[Any], metrics: Any) -> None:
        self.modules = memory_modules(model) if interval else []
        self.interval = interval if self.modules else None  # the transformer has none
        self.metrics = metrics
        self.handles: list[Any] = []
        self.stats: dict[str, list[float]] = {}
        self.doc_pos: dict[int, torch.Tensor] = {}

    def arm(self, iteration: int) -> None:
        """Install the hooks if ``iteration`` (the step about to run) is a telemetry step."""
        if not self.interval or iteration % self.interval or not self.modules:
            return
        self.stats, self.doc_pos = {}, {}
        for module in self.modules:
            self.handles += [
                module.register_forward_pre_hook(self._capture_doc_pos, with_kwargs=True),
                module.linear_in.register_forward_hook(self._make_proj_hook(module)),
                module.linear_out.register_forward_pre_hook(self._make_out_hook(module)),
            ]

    def _capture_doc_pos(self, module: Any, args: tuple, kwargs: dict) -> None:
        params = kwargs.get("packed_seq_params", args[2] if len(args) > 2 else None)
        if id(module) not in self.doc_pos and params is not None:
            self.doc_pos[id(module)] = params.doc_pos.detach()

    def _make_proj_hook(self, module: Any) -> Any:
        def hook(_: Any, args: tuple, output: Any) -> None:
            tag = _tag(module, module.kinds[0], "gate")
            if tag in self.stats:  # later micro-batches, activation recompute
                return
            with torch.no_grad():
                proj = output[0] if isinstance(output, tuple) else output
                s, b = proj.shape[0], proj.shape[1]
                dh = module.head_dim
                proj = (
                    proj.detach()
                    .float()
                    .view(s, b, module.num_heads_local, len(module.kinds), module.in_width)
                )
                for i, kind in enumerate(module.kinds):
                    gate = proj[:, :, :, i, 2 * dh].exp().mean(dim=(0, 1))
                    decay = (-proj[:, :, :, i, 2 * dh + 1].abs()).exp().mean(dim=(0, 1))
                    self.stats[_tag(module, kind, "gate")] = gate.cpu().tolist()
                    self.stats[_tag(module, kind, "decay")] = decay.cpu().tolist()

        return hook

    def _make_out_hook(self, module: Any) -> Any:
        def hook(_: Any, args: tuple) -> None:
            tag = _tag(module, module.kinds[0], "output_norm")
            if tag in self.stats:
                return
            with torch.no_grad():
                y = args[0].detach().float()
                s, b = y.shape[0], y.shape[1]
                y = y.view(s, b, module.num_heads_local, len(module.kinds), module.head_dim)
                norms = y.norm(dim=-1).mean(dim=(0, 1))  # [H_local, M]
                m = (
                    module.ltm_offset
                    if module.ltm_offset is not None
                    else module.mm.ltm_offset_inference
                )
                doc_pos = self.doc_pos.get(id(module))
                for i, kind in enumerate(module.kinds):
                    self.stats[_tag(module, kind, "output_norm")] = norms[:, i].cpu().tolist()
                    if doc_pos is not None:
                        span = memory_span(kind, module.mm.stm_max_lag, m)
                        empty = visible_pairs(doc_pos, span.min_lag, span.max_lag) == 0
                        self.stats[_tag(module, kind, "empty_rows")] = [empty.float().mean().item()]

        return hook

    def collect(self, iteration: int) -> None:
        """After a telemetry step: remove the hooks, gather on rank 0 and log (collective)."""
        if not self.interval or iteration % self.interval:
            return
        for handle in self.handles:
            handle.remove()
        self.handles = []
        local: dict[str, list[float]] = {}
        if parallel_state.get_data_parallel_rank() == 0:  # replicas hold the same heads
            local = dict(self.stats)
            for module in self.modules:
                local.update(parameter_stats(module))
        gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if dist.get_rank() != 0:
            return
        merged: dict[str, list[float]] = defaultdict(list)
        for part in gathered:  # ranks in order, so heads in tensor-parallel order
            for tag, values in (part or {}).items():
                merged[tag] += values
        scalars = {tag: sum(v) / len(v) for tag, v in merged.items() if v}
        histograms = {
            tag: v
            for tag, v in merged.items()
            if tag.rsplit("/", 1)[-1] in PARAMS + ("gate", "decay", "output_norm")
        }
        self.metrics.log_telemetry(iteration, scalars, histograms)
