"""The flex memories compile once, whatever the LTM offset m, and build each mask once.

Training draws a new m every step (paper §4). These tests run the real training path (the
project's train step and evaluation over Megatron's schedules, full activation recompute,
``model.memory_backend: flex``) with the FlexAttention read and block-mask builder compiled
on CPU under a counting backend, and with dynamo set to raise on a recompile-limit hit as
the training program sets it. Counts are per (compiled function, grad mode).
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from mp_harness import run_ranks
from paths import ROOT

ma_module = importlib.import_module("mm_megatron.ops.memory_attention")
pytestmark = pytest.mark.skipif(not ma_module.HAS_FLEX, reason="FlexAttention not importable")

MIN_DISTINCT_M = 20
MAX_STEPS = 60
EQUIVALENCE_OFFSETS = (3, 6)


class CountingBackend:
    """torch.compile backend: counts compiles by (kernel, grad mode), then runs aot_eager."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, bool]] = Counter()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._dynamo.backends.registry import lookup_backend

        kind = "flex_read" if "flex_attention" in gm.code else "block_mask"
        self.counts[(kind, torch.is_grad_enabled())] += 1
        return lookup_backend("aot_eager")(gm, example_inputs)


def _batches(cfg, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Random micro-batches with several packed documents per row (one of length 1)."""
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    while True:
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
        rows = []
        for _ in range(b):
            cuts = sorted({0, 5, 6, *torch.randint(1, s, (2,), generator=g).tolist()})
            lengths = [e - a for a, e in zip(cuts, cuts[1:] + [s], strict=True)]
            rows.append(torch.cat([torch.arange(n) for n in lengths]))
        yield {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "doc_pos": torch.stack(rows),
            "loss_mask": torch.ones(b, s),
        }


def _train_phase(counter: CountingBackend, world: int) -> dict:
    from megatron.core import parallel_state

    from mm_megatron.ops.memory_masks import MemoryMasks
    from pretrain.components import Components
    from pretrain.config import load_train_config
    from pretrain.steps import evaluate, ltm_offset_for_step, train_step

    # Count block-mask builds and lookups per MemoryMasks (one MemoryMasks per forward pass).
    builds: Counter[int] = Counter()
    lookups: Counter[int] = Counter()
    instances: list[MemoryMasks] = []
    orig_build, orig_lookup = MemoryMasks._build, MemoryMasks.block_mask

    def counted_build(self, *args):
        builds[id(self)] += 1
        return orig_build(self, *args)

    def counted_lookup(self, *args):
        if not instances or instances[-1] is not self:
            instances.append(self)  # keeps it alive: ids stay unique
        lookups[id(self)] += 1
        return orig_lookup(self, *args)

    MemoryMasks._build, MemoryMasks.block_mask = counted_build, counted_lookup

    overrides = [
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.ffn_hidden_size=64",
        "model.vocab_size=128",
        "model.seq_length=40",
        "model.short_window=32",
        "model.ltm_offset_min=2",
        "model.ltm_offset_max=32",
        "model.ltm_offset_inference=3",
        "model.scan_chunk_size=8",
        "model.memory_backend=flex",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        f"train.iters={MAX_STEPS}",
        "train.recompute=full",
        "train.precision=fp32",
        "optimizer.warmup_iters=1",
        "logging.eval_iters=1",
        "data.mock=true",
    ]
    cfg = load_train_config(str(ROOT / "pretrain" / "configs" / "tiny_mm.yaml"), overrides)
    parts = Components.build(cfg, torch.device("cpu"))
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    num_micro = cfg.num_microbatches(world)
    train_it, valid_it = [_batches(cfg, 0)], [_batches(cfg, 1)]

    seen_m, losses = set(), []
    for it in range(1, MAX_STEPS + 1):
        seen_m.add(ltm_offset_for_step(cfg, it))
        losses.append(train_step(cfg, model, optimizer, scheduler, train_it, num_micro, it)["loss"])
        if it % 10 == 0:
            losses.append(evaluate(cfg, model, valid_it, num_micro))
        if len(seen_m) >= MIN_DISTINCT_M and it >= 10:
            break
    losses.append(evaluate(cfg, model, valid_it, num_micro))
    MemoryMasks._build, MemoryMasks.block_mask = orig_build, orig_lookup
    per_pass = [(builds[id(m)], lookups[id(m)]) for m in instances]
    assert parallel_state.get_data_parallel_world_size() == world
    return {
        "distinct_m": len(seen_m),
        "losses": losses,
        "per_pass": per_pass,
        "fail_on_limit": torch._dynamo.config.fail_on_recompile_limit_hit,
        "layers": cfg.model.num_layers,
    }


def test_train_eval_recompute_compile_once_over_many_offsets(phases):
    """≥ 20 distinct m through train steps (full recompute) and evaluations: one compile of
    the flex read per grad mode and one of the block-mask builder; two block masks (STM,
    LTM) built per forward pass, looked up again by every layer and by the recompute."""
    out = phases["train"]
    assert out["fail_on_limit"] is True
    assert out["distinct_m"] >= MIN_DISTINCT_M
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    assert out["counts"] == {
        ("flex_read", True): 1,  # recompute's second forward (with grad)
        ("flex_read", False): 1,  # recompute's first forward and evaluation (no grad)
        ("block_mask", False): 1,  # always built outside autograd
    }, out["counts"]
    layers = out["layers"]
    train_passes = [p for p in out["per_pass"] if p[1] == 2 * 2 * layers]
    eval_passes = [p for p in out["per_pass"] if p[1] == 2 * layers]
    assert len(train_passes) + len(eval_passes) == len(out["per_pass"])
    assert len(train_passes) >= out["distinct_m"]  # one micro-batch per step
    assert len(eval_passes) >= 2
    # one build per distinct mask (STM, LTM) per forward pass, recompute included
    assert all(builds == 2 for builds, _ in out["per_pass"])


def _equivalence_phase(counter: CountingBackend, offsets: tuple[int, ...]) -> list:
    from mm_testing import batch, megatron_loss_and_grads, reference_loss_and_grads, tiny_config

    from mm_megatron.config import ParallelConfig
    from mm_megatron.convert.mm_layout import megatron_to_reference, reference_to_megatron
    from mm_megatron.reference import ReferenceMMModel

    cfg = tiny_config(memory_backend="flex")
    torch.manual_seed(0)
    ref = ReferenceMMModel(cfg)
    full = reference_to_megatron(ref.state_dict(), cfg)
    mbs = [batch(cfg, seed=5)]
    recompute = dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    out = []
    for m in offsets:
        ref.ltm_offset = m
        ref_loss, ref_grads = reference_loss_and_grads(ref, mbs[0])
        loss, grads, _, _ = megatron_loss_and_grads(
            cfg, ParallelConfig(), full, mbs, m, **recompute
        )
        out.append((m, ref_loss, ref_grads, loss, megatron_to_reference(grads, cfg)))
    return out


def _worker(rank: int, world: int) -> dict:
    """Both phases in one process (one Megatron import); compile counts per phase (their
    shapes differ, so each phase compiles once for itself)."""
    from mm_testing import init_parallel

    from mm_megatron.config import ParallelConfig
    from pretrain.components import configure_compile

    configure_compile()
    counter = CountingBackend()
    ma_module.configure_flex_compile(counter, on_cpu=True)
    init_parallel(ParallelConfig())
    equivalence = _equivalence_phase(counter, EQUIVALENCE_OFFSETS)
    equivalence_counts = dict(counter.counts)
    counter.counts.clear()
    train = _train_phase(counter, world)
    train["counts"] = dict(counter.counts)
    return {"equivalence": (equivalence, equivalence_counts), "train": train}


@pytest.fixture(scope="module")
def phases() -> dict:
    (out,) = run_ranks(_worker, 1)
    return out


def test_flex_model_with_recompute_matches_reference(phases):
    """Megatron model, flex backend compiled, full recompute, several m in one process:
    the reference model's loss and gradients (fp32), and still one compile per grad mode."""
    from mm_testing import assert_grads_close

    results, counts = phases["equivalence"]
    assert [r[0] for r in results] == list(EQUIVALENCE_OFFSETS)
    for m, ref_loss, ref_grads, loss, grads in results:
        assert abs(loss - ref_loss) < 1e-5, (m, loss, ref_loss)
        assert_grads_close(grads, ref_grads)
    assert counts == {
        ("flex_read", True): 1,
        ("flex_read", False): 1,
        ("block_mask", False): 1,
    }, counts
