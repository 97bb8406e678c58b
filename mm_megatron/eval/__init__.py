"""Evaluation of MM v2 and the transformer baseline (docs/evaluation.md): RULER-style long
context, many-shot in-context learning, and lm-evaluation-harness benchmarks, run by
``tools/evaluate.py`` on Hugging Face exports or Megatron checkpoints."""
