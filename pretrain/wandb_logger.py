"""Optional Weights & Biases logging beside TensorBoard (``logging.wandb_project``).

Off by default; nothing imports ``wandb`` unless it is enabled, and the config check
(:class:`pretrain.config_run.LoggingConfig`) rejects an enabled logger without the package
before any work starts. Only rank 0 logs. The W&B run id is kept in ``logging.dir`` so a
resumed (requeued) job continues the same W&B run instead of starting a new one.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from mm_megatron.config_loading import ConfigError

RUN_ID_FILE = "wandb_run_id.txt"


class WandbLogger:
    """Forwards scalar metrics to a W&B run."""

    def __init__(self, cfg: Any, resolved_config: dict[str, Any]) -> None:
        lg = cfg.logging
        try:
            wandb = importlib.import_module("wandb")
        except ImportError:
            raise ConfigError(
                "logging.wandb_project: the wandb package is not installed (pip install wandb)"
            ) from None
        run_id = None
        id_file = Path(lg.dir) / RUN_ID_FILE if lg.dir else None
        if id_file is not None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            run_id = wandb.util.generate_id()
        self.run = wandb.init(
            project=lg.wandb_project,
            entity=lg.wandb_entity,
            name=lg.wandb_run_name,
            id=run_id,
            resume="allow",
            mode=lg.wandb_mode,
            config=resolved_config,
            dir=lg.dir,
        )
        if id_file is not None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(f"{run_id}\n")

    def log(self, values: dict[str, float], step: int) -> None:
        """Log the finite numeric values of ``values`` at ``step``."""
        clean = {k: v for k, v in values.items() if isinstance(v, float | int) and math.isfinite(v)}
        if clean:
            self.run.log(clean, step=step)

    def close(self) -> None:
        self.run.finish()
