"""The training configuration: one YAML file, eight sections, each a typed dataclass.

    model       architecture (mm_megatron.config.ModelConfig)
    parallel    TP / PP / VPP / SP / distributed optimizer
    data        blends, tokenizer, cache
    train       batch sizes, length of the run, precision, recompute, seeds
    optimizer   AdamW and the LR schedule
    checkpoint  save / resume / retention
    logging     stdout, TensorBoard, validation, profiling  (pretrain.config_run)
    runtime     graceful stop, performance switches, watchdog (pretrain.config_run)

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
from pretrain.config_run import LoggingConfig, RuntimeConfig

ChangeKind = Literal["blend", "batch_size", "lr_schedule", "optimizer"]


@dataclass
class ParallelConfig(ModelParallelConfig):
    """The ``parallel:`` section: how the model is split (the fields of
    :class:`mm_megatron.config.ParallelConfig`) and Megatron-Core's data-parallel and pipeline
    communication options."""

    use_distributed_optimizer: bool = False
    """Shard the optimizer state (fp32 main weights, Adam moments) over the data-parallel
    ranks (Megatron's distributed optimizer). Needed by ``runtime.overlap_param_gather``."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (Megatron's DDP).
    Needed by ``runtime.overlap_param_gather``."""
    batch_p2p_comm: bool = True
    """Pipeline parallelism: send and receive activations between stages in one batched
    ``batch_isend_irecv`` call instead of separate sends and receives. With interleaving
    (``virtual_pipeline_model_parallel_size`` > 1) it excludes ``overlap_p2p_comm``, and
    with ``pipeline_model_parallel_size`` 2 it must be false (megatron-core gives wrong
    results)."""
    overlap_p2p_comm: bool = False
    """Interleaved pipelining: overlap the sends and receives between stages with compute
    (needs ``batch_p2p_comm: false``). Unused without interleaving."""

    def validate(self) -> None:
        super().validate()
        vpp = self.virtual_pipeline_model_parallel_size or 1
        if vpp > 1 and self.pipeline_model_parallel_size == 2 and self.batch_p2p_comm:
            if not self.overlap_p2p_comm:
                raise ConfigError(
                    "batch_p2p_comm: interleaved pipelining with pipeline_model_parallel_size 2 "
                    "and batched p2p gives silently wrong results in megatron-core (two sends to "
                    "the same peer in one batch); set batch_p2p_comm: false (optionally with "
                    "overlap_p2p_comm: true)"
                )
        if vpp > 1 and self.batch_p2p_comm and self.overlap_p2p_comm:
            raise ConfigError(
                "overlap_p2p_comm: megatron-core's interleaved pipeline schedule cannot use both "
                "overlap_p2p_comm and batch_p2p_comm; set batch_p2p_comm: false"
            )


@dataclass
class DataConfig:
    """The ``data:`` section: the tokenized datasets (Megatron ``.bin``/``.idx`` pairs, see
    tools/preprocess_data.py) and the tokenizer they were written with."""

    train_blend: list[Any] = field(default_factory=list)
    """The training datasets: ``[weight, prefix, weight, prefix, ...]`` or ``[prefix, ...]``
    (equal weights). A weight is the probability that a sample comes from that dataset,
    after normalisation, whatever its size (see mm_megatron.data.blends). Required unless
    ``mock``; without ``valid_blend`` and ``test_blend`` it is divided by ``split``."""
    valid_blend: list[Any] | None = None
    """Validation datasets, in the form of ``train_blend`` (null: a share of
    ``train_blend``, by ``split``). Setting it or ``test_blend`` turns ``split`` off."""
    test_blend: list[Any] | None = None
    """Test datasets, in the form of ``train_blend`` (null: a share of ``train_blend`` by
    ``split``, or none when ``valid_blend`` is set)."""
    split: str = "98,2,0"
    """``"train,valid,test"`` relative shares of the documents of ``train_blend`` (Megatron's
    split, normalised to sum 1; the train share must be > 0). Used only when neither
    ``valid_blend`` nor ``test_blend`` is set."""
    tokenizer: str = ""
    """The tokenizer the datasets were written with: a ``tokenizer.json``, a tiktoken or
    SentencePiece ``.model`` file, or a directory holding one, optionally prefixed ``hf:``,
    ``tiktoken:`` or ``sentencepiece:`` (mm_megatron.data.tokenizers.load_tokenizer). Checked
    against each dataset's recorded tokenizer at start and copied into the checkpoint
    directory. Its vocabulary must fit ``model.vocab_size``. Required unless ``mock``."""
    cache_dir: str | None = None
    """Directory for Megatron's dataset index files (sample and shuffle indices), shared by
    all ranks and runs (null: Megatron's default, a ``cache`` directory beside the data)."""
    mock: bool = False
    """Random tokens instead of datasets (smoke tests, benchmarks); the blends and the
    tokenizer are then unused (the end-of-text id is ``model.vocab_size - 1``)."""
    eod_mask_loss: bool = False
    """Leave out of the loss the positions whose input token is the end-of-text token (the
    prediction of the next document's first token; Megatron's ``eod_mask_loss``)."""
    epochs_warning: float = 1.0
    """Warn at start (in the blend plan) when the run would read a training dataset more than
    this many times: its documents repeat."""

    def validate(self) -> None:
        if not self.mock:
            if not self.train_blend:
                raise ConfigError("train_blend: required unless data.mock is true")
            if not self.tokenizer:
                raise ConfigError("tokenizer: required unless data.mock is true")
        if not self.epochs_warning > 0:
            raise ConfigError(f"epochs_warning: must be > 0, got {self.epochs_warning}")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ConfigError(f"split: expected three comma-separated numbers, got {self.split!r}")
        if not (self.valid_blend or self.test_blend) and not float(parts[0]) > 0:
            raise ConfigError(
                f"split: the train share (first number) must be > 0, got {self.split!r}"
            )


@dataclass
class TrainConfig:
    """The ``train:`` section: batch sizes, length of the run, seed, precision, recompute and
    the handling of bad batches."""

    micro_batch_size: int = 1
    """Sequences per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = 1
    """Sequences per optimizer step over all ranks (paper App. C: 1024 of 4096 tokens); a
    multiple of ``micro_batch_size`` x the data-parallel size, which gives the number of
    micro-batches accumulated per step."""
    iters: int | None = None
    """Length of the run in optimizer steps; give exactly one of ``iters`` and ``tokens``."""
    tokens: int | None = None
    """Length of the run in training tokens (paper §4: 200B small, 1T large), converted to
    ``floor(tokens / (global_batch_size x model.seq_length))`` steps (at least 1)."""
    seed: int = 1234
    """Seeds the initial weights (the same for any parallel layout), the dataset shuffling
    (numpy, hence 0 <= seed < 2**32), the per-step LTM offset m and Megatron's
    model-parallel RNG."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``bf16``: bf16 weights and activations, fp32 main weights in the optimizer
    (Megatron's mixed precision); ``fp32``: fp32 throughout; ``auto``: bf16 when CUDA is
    available, fp32 otherwise."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute. ``selective``: recompute each layer's memory core (key scan,
    values, memory reads; for the baseline, core attention) in backward and keep the GEMM
    outputs; ``full``: recompute whole layers (``recompute_num_layers`` at a time)."""
    recompute_num_layers: int = 1
    """With ``recompute: full``: layers per recomputed group (Megatron's uniform method: the
    input of each group of this many layers is kept, the rest recomputed in backward)."""
    skip_bad_batches: int = 0
    """Bad-batch budget: how many global batches with a non-finite loss or gradient may be
    skipped over the whole run (no update: model, optimizer and LR schedule stay as if the
    batch had never been seen; the batch counts as consumed). Each skip is logged; one more
    than this stops the run with status 1, as does any bad batch when 0 (the default)."""
    iterations_to_skip: list[int] = field(default_factory=list)
    """Iterations (1-based) whose global batch is read and thrown away without a forward
    pass or an update, as Megatron-LM's ``--iterations-to-skip``: step over a batch known to
    be bad when resuming after a failure."""
    spike_factor: float | None = None
    """Loss spike detector: log a warning when a step's loss exceeds ``spike_factor`` times
    the mean of the previous ``spike_window`` losses (None: off). It only logs."""
    spike_window: int = 100
    """Number of previous steps the spike detector averages over."""

    def validate(self) -> None:
        for name in (
            "micro_batch_size",
            "global_batch_size",
            "recompute_num_layers",
            "spike_window",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.skip_bad_batches < 0:
            raise ConfigError(f"skip_bad_batches: must be >= 0, got {self.skip_bad_batches}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(
                f"seed: must be in [0, 2**32) (numpy's dataset shuffling), got {self.seed}"
            )
        if any(i < 1 for i in self.iterations_to_skip):
            raise ConfigError(
                f"iterations_to_skip: iterations are 1-based, got {self.iterations_to_skip}"
            )
        if self.spike_factor is not None and not self.spike_factor > 0:
            raise ConfigError(f"spike_factor: must be > 0 or null, got {self.spike_factor}")
        if (self.iters is None) == (self.tokens is None):
            raise ConfigError("iters: give exactly one of train.iters and train.tokens")
        length = self.iters if self.iters is not None else self.tokens
        if length < 1:
            raise ConfigError("iters: the run length must be >= 1")


@dataclass
class OptimizerConfig:
    """The ``optimizer:`` section: AdamW and its learning-rate schedule (paper App. C: AdamW
    (0.9, 0.95), weight decay 0.1, gradient clipping 1.0, 2000 warm-up steps, cosine decay to
    peak/100; peak 3e-4 for the small models, 1e-3 for the large ones)."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float | None = None
    """Learning rate at the end of the decay, in [0, lr] (null: lr / 100, as the paper)."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay, >= 0; not applied to norm gains, biases and the
    per-head scalars β₀, β₁, α, γ, α_ψ (Eqs. 6 and 9)."""
    beta1: float = 0.9
    """Adam's first-moment decay, in [0, 1)."""
    beta2: float = 0.95
    """Adam's second-moment decay, in [0, 1)."""
    eps: float = 1e-8
    """Adam's denominator term, >= 0."""
    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this value, >= 0 (0: no clipping)."""
    warmup_iters: int = 2000
    """Steps of linear warm-up from 0 to ``lr``; fewer than the run's steps."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from ``lr`` to ``min_lr`` between the end of the warm-up and the last step of
    the run (``constant``: stay at ``lr``)."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr: must be in [0, lr], got {self.min_lr}")
        if self.warmup_iters < 0:
            raise ConfigError(f"warmup_iters: must be >= 0, got {self.warmup_iters}")
        for name in ("weight_decay", "eps", "clip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")

    @property
    def final_lr(self) -> float:
        return self.lr / 100 if self.min_lr is None else self.min_lr


@dataclass
class CheckpointConfig:
    """The ``checkpoint:`` section: where and how often to save, what to keep, what to start
    from (layout: pretrain/checkpointing.py)."""

    dir: str | None = None
    """Run directory: checkpoints are saved here, and a run resumes from the newest complete
    one found here (model, optimizer, schedule, data position). Null: no checkpoints."""
    interval: int = 1000
    """Save every this many steps, >= 1 (also at the end of the run and on a graceful
    stop)."""
    keep_last: int | None = 3
    """Retention: keep the newest this many checkpoints, >= 1, and the milestones (null: keep
    every checkpoint)."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (Megatron's asynchronous
    save; the run waits for the last one before it exits)."""
    init_from: str | None = None
    """A run directory whose newest complete checkpoint gives the model weights that start a
    new run, as a fine-tune does (optimizer, schedule and data position start afresh). Null:
    random initialisation. Ignored when ``dir`` already holds a checkpoint (resume)."""
    milestone_interval: int | None = None
    """Also keep every checkpoint whose iteration is a multiple of this (None: none):
    retention (``keep_last``) never deletes them. Use a multiple of ``interval``."""
    allow_changes: list[ChangeKind] = field(default_factory=list)
    """Config changes accepted when resuming (see pretrain.resume_guard): ``blend`` (data
    blends, split, seed), ``batch_size`` (global batch size), ``lr_schedule`` (peak and
    final LR, warm-up, decay style, weight decay, run length: the new schedule replaces the
    checkpoint's), ``optimizer`` (Adam betas and eps, gradient clipping). Model shape,
    sequence length and tokenizer changes are always refused."""
    init_from_unfinished: bool = False
    """``init_from`` must hold the final iteration of the run that saved it (a fine-tune from
    an unfinished pre-training run is refused), unless this is true."""

    def validate(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"interval: must be >= 1, got {self.interval}")
        if self.milestone_interval is not None and self.milestone_interval < 1:
            raise ConfigError(
                f"milestone_interval: must be >= 1 or null, got {self.milestone_interval}"
            )
        if self.milestone_interval is not None and self.milestone_interval % self.interval:
            raise ConfigError(
                f"milestone_interval: {self.milestone_interval} is not a multiple of "
                f"checkpoint.interval ({self.interval}), so no milestone would be saved"
            )
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"keep_last: must be >= 1 or null, got {self.keep_last}")


@dataclass
class Config:
    """A whole training config: one YAML file with these sections (only ``model`` is
    required; a section left out takes its defaults)."""

    model: ModelConfig
    """The architecture (:class:`mm_megatron.config.ModelConfig`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP / VPP / SP and the data-parallel options."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(iters=1))
    """Batch sizes, run length, seed, precision, recompute (default: one step)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and the learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Save, resume, retention, initial weights."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Stdout, TensorBoard, W&B, validation, telemetry, profiling."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Graceful stops, performance switches, timeouts, watchdog."""

    def validate(self) -> None:
        validate_layout(self.model, self.parallel)
        self._validate_position_loss()
        if self.model.seq_length < 2:
            raise ConfigError("model.seq_length: must be >= 2 for training")
        if self.optimizer.warmup_iters >= self.train_iters:
            raise ConfigError(
                f"optimizer.warmup_iters: {self.optimizer.warmup_iters} must be smaller than the "
                f"run length ({self.train_iters} iterations)"
            )
        from pretrain.perf import check_layout

        check_layout(self)  # performance switches against the parallel layout

    @property
    def position_loss_length(self) -> int:
        """Resolved ``logging.position_loss_length`` (default 4 x model.seq_length)."""
        return self.logging.position_loss_length or 4 * self.model.seq_length

    @property
    def position_loss_bucket(self) -> int:
        """Resolved ``logging.position_loss_bucket`` (default length // 8)."""
        return self.logging.position_loss_bucket or max(1, self.position_loss_length // 8)

    def _validate_position_loss(self) -> None:
        if self.logging.position_loss_interval is None:
            return
        length, tp = self.position_loss_length, self.parallel.tensor_model_parallel_size
        if self.data.mock:
            raise ConfigError(
                "logging.position_loss_interval: needs real validation documents; data.mock is true"
            )
        if self.position_loss_bucket > length:
            raise ConfigError(
                f"logging.position_loss_bucket: {self.position_loss_bucket} is "
                f"larger than position_loss_length {length}"
            )
        if self.parallel.sequence_parallel and length % tp:
            raise ConfigError(
                f"logging.position_loss_length: {length} is not divisible by "
                f"tensor_model_parallel_size {tp} (sequence_parallel)"
            )
        pp = self.parallel.pipeline_model_parallel_size
        vpp = self.parallel.virtual_pipeline_model_parallel_size or 1
        if vpp > 1 and self.logging.position_loss_sequences % pp:
            raise ConfigError(
                f"logging.position_loss_sequences: interleaved pipelining needs a "
                f"multiple of pipeline_model_parallel_size ({pp})"
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
