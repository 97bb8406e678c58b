"""The training configuration: one YAML file, eight sections, each a typed dataclass.

    model       architecture (mm_megatron.config.ModelConfig)
    parallel    TP / PP / VPP / SP / distributed optimizer
    data        blends, tokenizer, cache
    train       batch sizes, length of the run, precision, recompute, seeds
    optimizer   AdamW and the LR schedule
    checkpoint  save / resume / retention
    logging     stdout, TensorBoard, validation
    runtime     graceful stop (stop file, time limit)

:func:`load_train_config` applies ``key.path=value`` overrides, rejects unknown keys and
checks cross-section consistency (parallel sizes against the world size and the heads, batch
sizes that divide) before any work starts. Errors name the file and the dotted key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mm_megatron.config import ModelConfig, validate_layout
from mm_megatron.config import ParallelConfig as ModelParallelConfig
from mm_megatron.config_loading import ConfigError, apply_overrides, from_mapping, load_yaml


@dataclass
class ParallelConfig(ModelParallelConfig):
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    batch_p2p_comm: bool = True  # batched p2p in the pipeline schedule
    overlap_p2p_comm: bool = False

    def validate(self) -> None:
        super().validate()
        vpp = self.virtual_pipeline_model_parallel_size or 1
        if vpp > 1 and self.pipeline_model_parallel_size == 2 and self.batch_p2p_comm:
            if not self.overlap_p2p_comm:
                raise ConfigError(
                    "batch_p2p_comm: interleaved pipelining with pipeline_model_parallel_size 2 "
                    "and batched p2p gives silently wrong results in megatron-core (two sends to "
                    "the same peer in one batch); set batch_p2p_comm: false or "
                    "overlap_p2p_comm: true"
                )


@dataclass
class DataConfig:
    # Blends are [weight, prefix, weight, prefix, ...] (weights are per-sample probabilities)
    # or [prefix] alone. With only train_blend, `split` divides it into train/valid/test.
    train_blend: list[Any] = field(default_factory=list)
    valid_blend: list[Any] | None = None
    test_blend: list[Any] | None = None
    split: str = "98,2,0"
    tokenizer: str = ""  # tokenizer spec, see mm_megatron.data.tokenizers.load_tokenizer
    cache_dir: str | None = None  # shared cache of index files (Megatron's data cache path)
    mock: bool = False  # random tokens instead of a dataset (smoke tests, benchmarks)
    eod_mask_loss: bool = False

    def validate(self) -> None:
        if not self.mock:
            if not self.train_blend:
                raise ConfigError("train_blend: required unless data.mock is true")
            if not self.tokenizer:
                raise ConfigError("tokenizer: required unless data.mock is true")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ConfigError(f"split: expected three comma-separated numbers, got {self.split!r}")


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 1
    iters: int | None = None  # the run length: iters, or tokens (converted to iters)
    tokens: int | None = None
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    recompute: Literal["none", "full"] = "none"
    recompute_num_layers: int = 1

    def validate(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "recompute_num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if (self.iters is None) == (self.tokens is None):
            raise ConfigError("iters: give exactly one of train.iters and train.tokens")
        length = self.iters if self.iters is not None else self.tokens
        if length < 1:
            raise ConfigError("iters: the run length must be >= 1")


@dataclass
class OptimizerConfig:
    lr: float = 1e-3  # peak learning rate
    min_lr: float | None = None  # default: lr / 100 (paper: cosine to peak/100)
    weight_decay: float = 0.1  # not applied to norms and per-head scalars
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_iters: int = 2000
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr: must be in [0, lr], got {self.min_lr}")
        if self.warmup_iters < 0:
            raise ConfigError(f"warmup_iters: must be >= 0, got {self.warmup_iters}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")

    @property
    def final_lr(self) -> float:
        return self.lr / 100 if self.min_lr is None else self.min_lr


@dataclass
class CheckpointConfig:
    dir: str | None = None  # save here, and resume from here when it holds a checkpoint
    interval: int = 1000  # save every N iterations (and at the end, and on a stop)
    keep_last: int | None = 3  # retention; None keeps all
    async_save: bool = False  # write checkpoints in the background while training goes on
    init_from: str | None = None  # start a new run from these model weights (e.g. fine-tune)
    # init_from must hold the final iteration of the run that saved it, unless this is true.
    init_from_unfinished: bool = False

    def validate(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"interval: must be >= 1, got {self.interval}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"keep_last: must be >= 1 or null, got {self.keep_last}")


@dataclass
class LoggingConfig:
    dir: str | None = None  # TensorBoard event files and the resolved config
    interval: int = 10
    eval_interval: int | None = None  # validation loss every N iterations (None: never)
    eval_iters: int = 10
    peak_tflops: float | None = None  # per device, for MFU (H100/H200 dense bf16: 989)
    tensorboard: bool = True

    def validate(self) -> None:
        for name in ("interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_interval is not None and self.eval_interval < 1:
            raise ConfigError(f"eval_interval: must be >= 1 or null, got {self.eval_interval}")


@dataclass
class RuntimeConfig:
    stop_file: str | None = None  # stop gracefully when this file appears
    exit_duration_minutes: float | None = None  # stop gracefully after this much wall time
    exit_interval: int | None = None  # stop gracefully after N iterations of this process
    # Process-group (collective) timeout: start-up and the first step (compilation, checkpoint
    # load), then the rest of the run (torchtitan's init/train timeouts). null: keep the first.
    init_timeout_minutes: float = 30.0
    step_timeout_minutes: float | None = 10.0
    # Watchdog: a rank without step progress for this long (saves and validation excepted)
    # names the ranks that look hung, dumps its Python stacks and exits 1. null: off.
    hang_minutes: float | None = 10.0
    heartbeat_dir: str | None = None  # per-rank heartbeats (default: <logging.dir>/heartbeat)

    def validate(self) -> None:
        for name in ("init_timeout_minutes", "step_timeout_minutes", "hang_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be > 0 (or null where allowed), got {value}")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ConfigError(f"exit_interval: must be >= 1 or null, got {self.exit_interval}")
        if self.exit_duration_minutes is not None and self.exit_duration_minutes <= 0:
            raise ConfigError(
                f"exit_duration_minutes: must be > 0 or null, got {self.exit_duration_minutes}"
            )


@dataclass
class Config:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(iters=1))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        validate_layout(self.model, self.parallel)
        if self.model.seq_length < 2:
            raise ConfigError("model.seq_length: must be >= 2 for training")
        if self.optimizer.warmup_iters >= self.train_iters:
            raise ConfigError(
                f"optimizer.warmup_iters: {self.optimizer.warmup_iters} must be smaller than the "
                f"run length ({self.train_iters} iterations)"
            )

    @property
    def tokens_per_iter(self) -> int:
        return self.train.global_batch_size * self.model.seq_length

    @property
    def train_iters(self) -> int:
        if self.train.iters is not None:
            return self.train.iters
        return max(1, math.floor(self.train.tokens / self.tokens_per_iter))

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world; raises ConfigError when the layout does not fit."""
        tp = self.parallel.tensor_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by "
                f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp} x {pp}"
            )
        dp = world_size // (tp * pp)
        mbs, gbs = self.train.micro_batch_size, self.train.global_batch_size
        if gbs % (mbs * dp):
            raise ConfigError(
                f"train.global_batch_size: {gbs} is not divisible by micro_batch_size x "
                f"data-parallel size = {mbs} x {dp}"
            )
        num_micro = gbs // (mbs * dp)
        vpp = self.parallel.virtual_pipeline_model_parallel_size or 1
        if vpp > 1 and num_micro % pp:
            raise ConfigError(
                f"train.global_batch_size: interleaved pipelining needs the number of "
                f"micro-batches ({num_micro}) to be a multiple of pipeline_model_parallel_size "
                f"({pp})"
            )
        return dp

    def num_microbatches(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)


def load_train_config(path: str, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a training config; errors name the file and the key."""
    data = apply_overrides(load_yaml(path), overrides or [])
    try:
        return from_mapping(Config, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
