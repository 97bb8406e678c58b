"""The files copied into a Hugging Face export of MM v2: its configuration, cache and modeling
code (self-contained: torch and transformers only). The exporter is
:mod:`mm_megatron.convert.hf_export` (docs/release.md)."""
