"""Build the datasets only on the ranks that read them; the other ranks receive batches.

As in Megatron-LM (``is_dataset_built_on_rank`` in ``pretrain_gpt.py``), only the first
rank of each tensor-parallel group builds (and reads) the datasets: the ranks of a TP group
train on the same micro-batches, so TP rank 0 broadcasts each one to the others. Unlike
Megatron's GPT, every pipeline stage keeps its builder rank, because every MM v2 layer reads
the documents' positions. Megatron's ``BlendedMegatronDatasetBuilder`` builds on global
rank 0 first, which writes the index files to ``data.cache_dir`` (by default a ``cache``
directory beside the data), then, after a barrier, on the other building ranks, which load
those files: one index build per run, and start-up at 256 ranks with TP 8 opens the indices
32 times, not 256.

"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

KEYS = ("tokens", "labels", "loss_mask", "doc_pos")


class RemoteSplit:
    """Stands for a split that exists but is built on this TP group's first rank only."""


def dataset_built_on_rank() -> bool:
    """Whether this rank builds the datasets: the first rank of its tensor-parallel group."""
    return parallel_state.get_tensor_model_parallel_rank() == 0


def build_on_needed_ranks(
    build: Callable[..., tuple], *args: Any, log: Callable[[str], None] | None = None
) -> tuple:
    """``build(*args)`` (``pretrain.data.build_datasets``) on the TP-rank-0 ranks only; the
    other ranks get a :class:`RemoteSplit` for each split their group's builder has."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return build(*args)
    splits = list(build(*args, is_built_on_rank=dataset_built_on_rank))
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    present = torch.tensor([s is not None for s in splits], dtype=torch.int64, device=device)
    dist.broadcast(
        present,
        parallel_state.get_tensor_model_parallel_src_rank(),
        group=parallel_state.get_tensor_model_parallel_group(),
    )
    built = torch.tensor(
        [int(any(s is not None for s in splits))], dtype=torch.int64, device=device
    )
    dist.all_reduce(built)
    if log is not None:
        log(
            f"datasets built on {int(built.item())} of {dist.get_world_size()} ranks (the first "
            "rank of each tensor-parallel group; the others receive its batches)"
        )
    if not dataset_built_on_rank():
        splits = [RemoteSplit() if flag else None for flag in present.tolist()]
    return tuple(splits)


class TensorParallelStream:
    """Micro-batches read on TP rank 0 (``stream``) and broadcast to the group's ranks."""

    def __init__(
        self, stream: Any | None, micro_batch_size: int, seq_length: int, device: torch.device
    ) -> None:
        self.stream = stream
        self.shape = (len(KEYS), micro_batch_size, seq_length)
        self.device = device
        self.wait_seconds = 0.0

    def __iter__(self) -> TensorParallelStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        if self.stream is not None:
            batch = next(self.stream)
            packed = torch.stack([batch[k].to(torch.int64) for k in KEYS])
        else:
            packed = torch.empty(self.shape, dtype=torch.int64, device=self.device)
        dist.broadcast(
            packed,
            parallel_state.get_tensor_model_parallel_src_rank(),
            group=parallel_state.get_tensor_model_parallel_group(),
        )
        out = dict(zip(KEYS, packed.unbind(0), strict=True))
        out["loss_mask"] = out["loss_mask"].float()  # 0/1 values, exact through int64
        self.wait_seconds += time.perf_counter() - start
        return out


def wrap_stream(
    make_stream: Callable[[], Any],
    dataset: Any,
    micro_batch_size: int,
    seq_length: int,
    device: torch.device,
) -> Any:
    """The trainer's stream for ``dataset``: itself when TP is 1, else broadcast over TP."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return make_stream()
    stream = None if isinstance(dataset, RemoteSplit) else make_stream()
    return TensorParallelStream(stream, micro_batch_size, seq_length, device)
