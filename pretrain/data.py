"""Training data: Megatron ``GPTDataset`` blends and an exact, resumable sample order.

Every sample's ``position_ids`` are reset after each end-of-text token
(``reset_position_ids``), which makes them the position of each token within its document:
the MM v2 memories and key recurrence use them to stay inside documents (a sample that
starts inside a document treats its first token as that document's start).

Sample order: iteration ``i`` consumes the global samples ``[i·G, (i+1)·G)`` (G the global
batch size). Each micro-batch takes the next ``mbs·dp`` of them, data-parallel rank r the
r-th slice, exactly as Megatron's pretraining sampler. The only state is the number of
consumed samples, saved in checkpoints, so a resumed run sees what an uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from mm_megatron.config_loading import ConfigError
from pretrain.config import Config


@dataclass
class TokenizerView:
    """What Megatron's datasets read from a tokenizer."""

    vocab_size: int
    eod: int
    pad: int = -1

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """Part of the dataset cache key (Megatron hashes the dataset config)."""
        return {"class": "TokenizerView", "vocab_size": self.vocab_size, "eod": self.eod}


def parse_blend(blend: list[Any] | None, key: str) -> tuple[list[str], list[float] | None] | None:
    """``[w1, p1, w2, p2, ...]`` or ``[p1, p2, ...]`` → Megatron's ``(prefixes, weights)``."""
    from mm_megatron.data.blends import BlendError
    from mm_megatron.data.blends import parse_blend as parse_pairs

    if not blend:
        return None
    try:
        pairs = parse_pairs(list(blend))
    except BlendError as err:
        raise ConfigError(f"{key}: {err}") from None
    prefixes = [p for _, p in pairs]
    if all(isinstance(x, str) for x in blend):
        return prefixes, None  # prefixes alone: Megatron's equal weighting
    weights = [w for w, _ in pairs]
    if any(w <= 0 for w in weights):
        raise ConfigError(f"{key}: weights must be > 0, got {weights}")
    return prefixes, weights


def check_blends_exist(cfg: Config) -> None:
    """Every prefix of every blend has its .bin and .idx (errors name the key and prefix)."""
    from mm_megatron.data.blends import BlendError, validate_blend

    for split in ("train", "valid", "test"):
        blend = getattr(cfg.data, f"{split}_blend")
        if blend:
            try:
                validate_blend(list(blend), check_contents=True)
            except BlendError as err:
                raise ConfigError(f"data.{split}_blend: {err}") from None


def build_datasets(
    cfg: Config,
    tokenizer: TokenizerView,
    num_samples: list[int],
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[Any, Any, Any]:
    """Train, valid and test datasets (None where a split is empty, and on the ranks where
    ``is_built_on_rank`` is false)."""
    d = cfg.data
    per_split = None
    if d.valid_blend or d.test_blend:
        per_split = [
            parse_blend(d.train_blend, "data.train_blend"),
            parse_blend(d.valid_blend, "data.valid_blend"),
            parse_blend(d.test_blend, "data.test_blend"),
        ]
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=None if (d.mock or per_split) else parse_blend(d.train_blend, "data.train_blend"),
        blend_per_split=None if d.mock else per_split,
        split=None if per_split else d.split,
        path_to_cache=d.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=True,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    cls = MockGPTDataset if d.mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, num_samples, is_built_on_rank, config)
    return tuple(builder.build())


class BatchStream:
    """Micro-batches for one data-parallel rank, from a consumed-samples position."""

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int,
        device: torch.device,
    ) -> None:
        self.dataset = dataset
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.consumed = consumed_samples
        self.device = device
        self.wait_seconds = 0.0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        first = self.consumed + self.dp_rank * self.mbs
        n = len(self.dataset)
        samples = [self.dataset[(first + i) % n] for i in range(self.mbs)]
        self.consumed += self.mbs * self.dp_size
        batch = {
            "tokens": torch.stack([s["tokens"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
            "doc_pos": torch.stack([s["position_ids"] for s in samples]),
        }
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.wait_seconds += time.perf_counter() - start
        return batch
