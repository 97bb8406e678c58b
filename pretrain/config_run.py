"""The sections of the training configuration that observe and steer a run rather than define
it: ``logging`` (with its ``profile`` subsection) and ``runtime``. Part of
:class:`pretrain.config.Config`; each field is documented under its declaration."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from mm_megatron.config_loading import ConfigError


@dataclass
class ProfileConfig:
    """``logging.profile``: capture steps ``start_step`` .. ``end_step`` (1-based, inclusive)."""

    start_step: int | None = None
    """First profiled step; null (default) turns profiling off."""
    end_step: int | None = None
    """Last profiled step (default: ``start_step``)."""
    dir: str | None = None
    """Output directory (default: ``<logging.dir>/profile``): ``trace_rank0_steps<a>-<b>.json``
    (open in Perfetto or chrome://tracing) and, with ``memory_snapshot``, a ``.pickle``."""
    memory_snapshot: bool = False
    """Also record a CUDA memory snapshot over the range (``memory_viz``); CUDA only."""
    record_shapes: bool = False
    """Record operator input shapes in the trace (bigger trace, slower steps)."""

    @property
    def enabled(self) -> bool:
        return self.start_step is not None

    @property
    def last_step(self) -> int:
        assert self.start_step is not None
        return self.end_step if self.end_step is not None else self.start_step

    def validate(self) -> None:
        if self.start_step is None:
            if self.end_step is not None:
                raise ConfigError("end_step: set start_step too")
            return
        if self.start_step < 1:
            raise ConfigError(f"start_step: must be >= 1, got {self.start_step}")
        if self.last_step < self.start_step:
            raise ConfigError(
                f"end_step: must be >= start_step ({self.start_step}), got {self.end_step}"
            )


@dataclass
class LoggingConfig:
    """The ``logging:`` section: stdout, TensorBoard, Weights & Biases, validation,
    telemetry, profiling and the loss-by-position log."""

    dir: str | None = None
    """Log directory: the resolved ``config.yaml``, TensorBoard event files, the W&B run id,
    the default profile and heartbeat directories (null: none of these files)."""
    interval: int = 10
    """Print (and record) loss, learning rate, gradient norm, step time, throughput, TFLOP/s
    and MFU every this many steps, >= 1 (and at the last step)."""
    eval_interval: int | None = None
    """Validation loss every this many steps, >= 1, and at the last step (null: never)."""
    eval_iters: int = 10
    """Global batches of the validation datasets per validation, >= 1, read at the inference
    LTM offset ``model.ltm_offset_inference``."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, > 0, for the MFU column (H100/H200 dense bf16: 989);
    null: no MFU."""
    tensorboard: bool = True
    """Write TensorBoard event files into ``dir`` (no effect when ``dir`` is null)."""
    telemetry_interval: int | None = None
    """Every N iterations, record per-layer MM v2 statistics (per-head beta0, beta1, alpha,
    gamma, alpha_psi; key gate and decay; STM and LTM output norms; share of empty memory
    rows) as TensorBoard scalars and histograms (None: off)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (None: off). Needs the ``wandb`` package."""
    wandb_entity: str | None = None
    """W&B entity (team or user); None: the account's default."""
    wandb_run_name: str | None = None
    """W&B run name; None: W&B picks one. A resumed run continues the same W&B run (its id
    is kept in ``logging.dir``)."""
    wandb_mode: Literal["online", "offline"] = "online"
    """``offline`` writes W&B files locally for a later ``wandb sync``."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Torch profiler trace (and optional CUDA memory snapshot) of a step range, on rank 0."""
    position_loss_interval: int | None = None
    """Every N iterations, log the validation loss by position bucket (TensorBoard scalars
    ``position_loss/<first>-<last>`` and a stdout line; pretrain/position_log.py): the
    cheapest early signal of length extrapolation. None (default): never."""
    position_loss_length: int | None = None
    """Positions per evaluated sequence; default 4 x model.seq_length (beyond the training
    length). Each sequence is the start of a validation document at least this long + 1."""
    position_loss_bucket: int | None = None
    """Positions per bucket; default position_loss_length // 8."""
    position_loss_sequences: int = 4
    """Documents evaluated each time (the first long-enough ones of the first validation
    dataset, or of the first training dataset without a valid_blend), one per micro-batch."""

    def validate(self) -> None:
        for name in ("interval", "eval_iters", "position_loss_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"peak_tflops: must be > 0 or null, got {self.peak_tflops}")
        if self.telemetry_interval is not None and self.telemetry_interval < 1:
            raise ConfigError(
                f"telemetry_interval: must be >= 1 or null, got {self.telemetry_interval}"
            )
        if self.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "wandb_project: Weights & Biases logging is enabled but the wandb package is "
                "not installed (pip install wandb), or set logging.wandb_project: null"
            )
        if self.eval_interval is not None and self.eval_interval < 1:
            raise ConfigError(f"eval_interval: must be >= 1 or null, got {self.eval_interval}")
        if self.profile.enabled and self.profile.dir is None and self.dir is None:
            raise ConfigError("profile.dir: needed when logging.dir is null")
        if self.position_loss_interval is not None and self.position_loss_interval < 1:
            raise ConfigError(
                f"position_loss_interval: must be >= 1 or null, got {self.position_loss_interval}"
            )
        if self.position_loss_length is not None and self.position_loss_length < 2:
            raise ConfigError(
                f"position_loss_length: must be >= 2 or null, got {self.position_loss_length}"
            )
        if self.position_loss_bucket is not None and self.position_loss_bucket < 1:
            raise ConfigError(
                f"position_loss_bucket: must be >= 1 or null, got {self.position_loss_bucket}"
            )


@dataclass
class RuntimeConfig:
    """The ``runtime:`` section: graceful stops, GPU performance switches, collective
    timeouts and the hang watchdog."""

    stop_file: str | None = None
    """Stop gracefully when this file appears: save a checkpoint at the next step boundary
    and exit with status 75, to be requeued (null: off)."""
    exit_duration_minutes: float | None = None
    """Stop gracefully (as ``stop_file``) this many minutes, > 0, after this process started
    training (null: off)."""
    exit_interval: int | None = None
    """Stop gracefully (as ``stop_file``) after this many steps of this process, >= 1 (null:
    off)."""
    # GPU performance switches (see pretrain/perf.py). Each flag: null = decided by `fusions`
    # (auto: on where this machine supports it; off: off), true = on (a config error at start
    # when this machine cannot run it), false = off.
    fusions: Literal["auto", "off"] | bool = "auto"
    """Default for the switches below left null; ``auto`` logs what it enabled and why not.
    (YAML reads a bare ``off`` as false; that means ``off`` here.)"""
    gradient_accumulation_fusion: bool | None = None
    """Accumulate weight gradients straight into the fp32 main grads in the GEMM (CUDA and
    apex's ``fused_weight_gradient_mlp_cuda``)."""
    bias_swiglu_fusion: bool | None = None
    """Megatron's fused SwiGLU (bias + SiLU-gate in one kernel, hand-written backward). Runs on
    CPU too (compiled slowly), so it may be forced on there; auto: CUDA only."""
    norm_linear_fusion: bool | None = None
    """MM v2 under Transformer Engine: RMSNorm fused into the memories' input projection and
    fc1 (``TELayerNormColumnParallelLinear``), as the TE baseline has. Needs the TE backend."""
    overlap_param_gather: bool | None = None
    """Distributed optimizer: overlap the parameter all-gather with the next forward (and
    align it across pipeline stages). Needs use_distributed_optimizer and overlap_grad_reduce."""
    tp_comm_overlap: bool | None = None
    """Overlap TP communication with GEMMs (TE userbuffers). Needs CUDA, the TE backend,
    tensor_model_parallel_size >= 2 and sequence_parallel."""

    init_timeout_minutes: float = 30.0
    """Process-group (collective) timeout for start-up and the first step (compilation,
    checkpoint load), as torchtitan's init timeout."""
    step_timeout_minutes: float | None = 10.0
    """Collective timeout for the rest of the run, set after the first step (null: keep
    ``init_timeout_minutes``)."""
    hang_minutes: float | None = 10.0
    """Watchdog: a rank without step progress for this long (saves and validation excepted)
    names the ranks that look hung, dumps its Python stacks and exits 1 (null: off)."""
    heartbeat_dir: str | None = None
    """Per-rank heartbeat files of the watchdog (default: ``<logging.dir>/heartbeat``)."""

    def validate(self) -> None:
        for name in ("init_timeout_minutes", "step_timeout_minutes", "hang_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be > 0 (or null where allowed), got {value}")
        if isinstance(self.fusions, bool):
            if self.fusions:
                raise ConfigError("fusions: expected auto or off, got true")
            self.fusions = "off"
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ConfigError(f"exit_interval: must be >= 1 or null, got {self.exit_interval}")
        if self.exit_duration_minutes is not None and self.exit_duration_minutes <= 0:
            raise ConfigError(
                f"exit_duration_minutes: must be > 0 or null, got {self.exit_duration_minutes}"
            )
