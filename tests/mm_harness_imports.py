"""Re-exports used by several model tests."""

from mm_megatron.reference import ReferenceMMModel
from mm_megatron.weight_layout import megatron_to_reference, reference_to_megatron

__all__ = ["ReferenceMMModel", "megatron_to_reference", "reference_to_megatron"]
