"""Evaluation suites of MM v2 and its transformer baseline ("Memory Mosaics at scale", arXiv
2507.03285): long-term memory removal and the inference-m sweep (Tables 2, 9, 10), loss by
position beyond the training length, and multi-query associative recall."""
