"""MM v2 primitives: reference forms (naive) and the fast paths tested against them."""

from mm_megatron.ops.gated_scan import gated_key_scan_torch, gated_keys_chunked
from mm_megatron.ops.key_scan import SCAN_BACKENDS, gated_key_scan
from mm_megatron.ops.memory_attention import MEMORY_BACKENDS, memory_attention
from mm_megatron.ops.naive import (
    adaptive_beta,
    gated_keys_naive,
    l2_normalize,
    memory_attention_dense,
    memory_mask,
    shifted_values,
    visible_pairs,
)

__all__ = [
    "MEMORY_BACKENDS",
    "SCAN_BACKENDS",
    "adaptive_beta",
    "gated_key_scan",
    "gated_key_scan_torch",
    "gated_keys_chunked",
    "gated_keys_naive",
    "l2_normalize",
    "memory_attention",
    "memory_attention_dense",
    "memory_mask",
    "shifted_values",
    "visible_pairs",
]
