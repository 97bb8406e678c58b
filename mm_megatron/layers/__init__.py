"""Megatron-Core modules of MM v2: the memories mixer, the norm, depth-scaled linears."""
