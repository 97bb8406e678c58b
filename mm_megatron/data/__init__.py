"""Corpus tooling: tokenizers, readers, the indexed-dataset writer, blends, demo corpus.

Importing this package does not import torch or megatron.
"""

from .blends import BlendError, parse_blend, to_megatron_blend, validate_blend
from .indexed import IndexedWriter, dataset_exists, merge_datasets, optimal_dtype, read_index
from .tokenizers import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "BlendError",
    "IndexedWriter",
    "Tokenizer",
    "TokenizerError",
    "dataset_exists",
    "load_tokenizer",
    "merge_datasets",
    "optimal_dtype",
    "parse_blend",
    "read_index",
    "to_megatron_blend",
    "validate_blend",
]
