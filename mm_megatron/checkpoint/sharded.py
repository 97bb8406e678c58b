"""The sharded state of a model (and optimizer) and its atomic, verified torch_dist save.

A checkpoint is written into ``iter_XXXXXXX.tmp``; once every rank has finished, rank 0
writes ``config.yaml`` and the manifest (:mod:`mm_megatron.checkpoint.format`), renames the
directory and then rewrites the tracker (each by a rename), so an interrupted save never
looks complete. Each rank hashes (sha256) the shards it wrote, and the manifest records every
file's size and hash. The model and optimizer are saved with their sharded state dicts, so a
checkpoint loads under another TP/PP/DP layout.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from mm_megatron.checkpoint import format as fmt

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """The progress a checkpoint records besides the weights."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


def current_layout() -> dict[str, int]:
    """This process group's TP, PP and DP sizes (recorded in the manifest)."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_object() -> ShardedObject:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    pp = parallel_state.get_pipeline_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_rank()
    return ShardedObject(
        "rng_state",
        state,
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (pp, tp),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def sharded_state(
    model: list[Any],
    optimizer: Any | None,
    scheduler: Any | None,
    state: TrainState,
    is_loading: bool,
    with_rng: bool = True,
) -> dict[str, Any]:
    """The checkpoint's sharded state dict (model chunks, optimizer, scheduler, RNG, data)."""
    model = unwrap_model(model)
    sd: dict[str, Any] = {}
    if len(model) == 1:
        sd["model"] = model[0].sharded_state_dict()
    else:
        for i, chunk in enumerate(model):
            sd[f"model{i}"] = chunk.sharded_state_dict()
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = vars(state).copy()
    sd["layout"] = current_layout()
    if with_rng:
        sd["rng_state"] = _rng_object()
    return sd


def save_checkpoint(
    root: str | Path,
    model: list[Any],
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    config_dict: dict[str, Any],
    async_queue: Any = None,
    *,
    on_published: Callable[[Path, int], None] | None = None,
    on_save_error: Callable[[BaseException, Path], None] | None = None,
) -> Path:
    """Save atomically (see module docstring); collective over all ranks.

    With ``async_queue`` (a megatron ``AsyncCallsQueue``) the tensors are written in the
    background; the checkpoint becomes visible (manifest, rename, tracker) only when the
    queue finalises the call after every rank has finished writing. ``on_published(root,
    iteration)`` runs on rank 0 after the tracker moved (retention); ``on_save_error(err,
    tmp)`` may raise a more telling error when a synchronous save fails.
    """
    final = fmt.iteration_dir(root, state.iteration)
    tmp = final.with_name(final.name + fmt.TMP_SUFFIX)
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = sharded_state(model, optimizer, scheduler, state, is_loading=False)
    publish = functools.partial(
        _publish, Path(root), tmp, final, state.iteration, config_dict, on_published
    )
    if async_queue is not None:
        request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
        return final
    try:
        dist_checkpointing.save(sd, str(tmp))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException wraps the OSError
        if on_save_error is not None:
            on_save_error(err, tmp)
        raise
    dist.barrier()
    publish()
    dist.barrier()
    return final


def _own_shard_hashes(tmp: Path) -> dict[str, str]:
    """sha256 of the shards this rank wrote (torch_dist names them ``__<rank>_<n>.distcp``),
    hashed right after writing, while they are still in the page cache; gathered from every
    rank (collective), so no rank reads the whole checkpoint."""
    rank = dist.get_rank()
    mine = {p.name: fmt.sha256_file(p) for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered if part for k, v in part.items()}


def _publish(
    root: Path,
    tmp: Path,
    final: Path,
    iteration: int,
    config_dict: dict[str, Any],
    on_published: Callable[[Path, int], None] | None,
) -> None:
    """Once every rank's files are written (collective): every rank hashes its shards, then
    rank 0 writes the manifest, renames and rewrites the tracker."""
    hashes = _own_shard_hashes(tmp)
    if dist.get_rank() != 0:
        return
    fmt.write_run_config(tmp, config_dict)
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
    for p in paths:  # the small common files (metadata, common state, config)
        hashes.setdefault(str(p.relative_to(tmp)), fmt.sha256_file(p))
    manifest = {
        "iteration": iteration,
        "layout": current_layout(),
        "files": files,
        "sha256": {name: hashes[name] for name in files},
    }
    fmt.write_manifest(tmp, manifest)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fmt.write_tracker(root, iteration)
    if on_published is not None:
        on_published(root, iteration)
