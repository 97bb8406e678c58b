"""Hugging Face configuration of Memory Mosaics v2 ("Memory Mosaics at scale", arXiv 2507.03285).

Self-contained: imports only ``transformers`` and the standard library, so it can be shipped
next to ``modeling_memory_mosaics.py`` in a model directory and loaded with
``trust_remote_code=True``. The definitions marked ``# Copied from`` are copies of the
library's (``mm_megatron``), checked by ``tools/check_copies.py``.
"""

from __future__ import annotations

import os
from typing import Any

import transformers
from packaging.version import Version
from transformers import PretrainedConfig

# The transformers releases this model is tested with (generation, fine-tuning, evaluation),
# oldest and newest: tools/transformers_matrix.py runs the tests against both ends and the
# locked version. Outside the range loading fails, because transformers changes how generate()
# passes the cache between releases (5.24 renamed it) and a mismatch decodes wrong tokens
# silently. Set MEMORY_MOSAICS_ALLOW_UNTESTED_TRANSFORMERS=1 to load with a newer, untested one.
MIN_TRANSFORMERS = "4.56.0"
BELOW_TRANSFORMERS = "5.25"
SUPPORTED_TRANSFORMERS = f">={MIN_TRANSFORMERS},<{BELOW_TRANSFORMERS}"
ALLOW_UNTESTED_ENV = "MEMORY_MOSAICS_ALLOW_UNTESTED_TRANSFORMERS"


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Raise ImportError when ``version`` is outside :data:`SUPPORTED_TRANSFORMERS`."""
    v = Version(version)
    if v < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"Memory Mosaics needs transformers {SUPPORTED_TRANSFORMERS}; transformers {version} "
            f"is installed (pip install 'transformers{SUPPORTED_TRANSFORMERS}')"
        )
    if v.release[:2] >= Version(BELOW_TRANSFORMERS).release[:2] and os.environ.get(
        ALLOW_UNTESTED_ENV, ""
    ) not in ("1", "true", "yes"):
        raise ImportError(
            f"Memory Mosaics is tested with transformers {SUPPORTED_TRANSFORMERS}; transformers "
            f"{version} is installed. Install a tested release (pip install "
            f"'transformers{SUPPORTED_TRANSFORMERS}'), or set {ALLOW_UNTESTED_ENV}=1 to load "
            "anyway and compare cached with uncached generation first."
        )


check_transformers_version()


# Copied from mm_megatron.config.max_ltm_offset
def max_ltm_offset(stm_max_lag: int) -> int:
    """The largest offset m of the long-term memory: the short-term memory reads lags
    1..stm_max_lag and the long-term memory lags ≥ m, so a larger m leaves some pairs in
    neither memory. With Eq. 10 (stm_max_lag = h - 1) this is the paper's m ≤ h (§3.3)."""
    return stm_max_lag + 1


class MemoryMosaicsConfig(PretrainedConfig):
    """Architecture of an MM v2 language model.

    Args:
        vocab_size: vocabulary size (unpadded).
        hidden_size: model width d.
        num_hidden_layers: number of blocks N_b.
        num_heads: heads H *per memory type* (H short-term and H long-term heads of
            ``hidden_size // num_heads`` channels each).
        intermediate_size: hidden width d' of the SwiGLU persistent memory.
        short_window: h; the short-term memory at position t reads pairs t-stm_max_lag..t-1.
        stm_max_lag: largest lag read by the short-term memory (h-1 for Eq. 10, h for Fig. 11).
        ltm_offset: inference m; the long-term memory at position t reads pairs 0..t-m.
        long_term_memory: False for the "without long-term memory" ablation.
        rms_norm_eps: epsilon of the RMSNorms.
        l2_norm_eps: floor of the L2 norm in the key and value normalisation (Eq. 8, Eq. 9).
        supported_transformers: the transformers releases the model code is tested with
            (informational in ``config.json``; the check uses the shipped code's range).
    """

    model_type = "memory_mosaics"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_attention_heads": "num_heads"}

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_heads: int = 32,
        intermediate_size: int = 14336,
        short_window: int = 256,
        stm_max_lag: int = 255,
        ltm_offset: int = 64,
        long_term_memory: bool = True,
        rms_norm_eps: float = 1e-5,
        l2_norm_eps: float = 1e-6,
        max_position_embeddings: int = 4096,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.short_window = short_window
        self.stm_max_lag = stm_max_lag
        self.ltm_offset = ltm_offset
        self.long_term_memory = long_term_memory
        self.rms_norm_eps = rms_norm_eps
        self.l2_norm_eps = l2_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        kwargs.pop("supported_transformers", None)
        self.supported_transformers = SUPPORTED_TRANSFORMERS
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if not 1 <= ltm_offset <= max_ltm_offset(stm_max_lag):
            raise ValueError(
                f"ltm_offset {ltm_offset} must be in [1, stm_max_lag + 1 = {stm_max_lag + 1}], "
                "or some pairs are in neither memory"
            )
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def memory_kinds(self) -> tuple[str, ...]:
        """The contextual memories of each block, in the input order of W_o."""
        return ("short", "long") if self.long_term_memory else ("short",)
