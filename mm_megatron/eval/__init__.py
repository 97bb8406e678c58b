"""Evaluation of MM v2 and the transformer baseline ("Memory Mosaics at scale", arXiv
2507.03285; docs/evaluation.md), run by ``tools/evaluate.py`` on Hugging Face exports or
Megatron checkpoints: RULER-style long context, many-shot in-context learning,
lm-evaluation-harness benchmarks, long-term memory removal and the inference-m sweep
(Tables 2, 9, 10), loss by position beyond the training length, and multi-query associative
recall."""
