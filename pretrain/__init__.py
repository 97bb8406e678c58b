"""Pretraining of MM v2 and its baselines on Megatron-Core."""
