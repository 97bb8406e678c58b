"""Hugging Face release format: MM v2 as a self-contained remote-code model, the transformer
baseline as ``LlamaForCausalLM``, and an exporter that proves logit parity (docs/release.md)."""

from mm_megatron.hf.export import ParityError, ParityReport, check_parity, export_hf

__all__ = ["ParityError", "ParityReport", "check_parity", "export_hf"]
