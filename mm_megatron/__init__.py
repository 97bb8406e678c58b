"""Memory Mosaics v2 as Megatron-Core layers.

Paper: "Memory Mosaics at scale", Zhang & Bottou, arXiv 2507.03285.
"""
