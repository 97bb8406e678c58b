"""Checkpoint conversion, the last step of the data flow (corpus → :mod:`mm_megatron.data` →
:mod:`mm_megatron.model` → :mod:`mm_megatron.checkpoint` → here → :mod:`mm_megatron.hf`).

Weight layouts, each with both directions in one module: :mod:`.mm_layout` (MM v2: Megatron
↔ the paper's reference layout ↔ HF names), :mod:`.llama_layout` (the transformer baseline:
Megatron GPT ↔ ``LlamaForCausalLM``), :mod:`.hf_layout` (either architecture, one layer at a
time) and :mod:`.hf_config` (``ModelConfig`` ↔ HF ``config.json``, expected HF shapes).

Megatron side: :mod:`.megatron_state` (names and vocabulary padding), :mod:`.megatron_io`
(full state on CPU: load, model-only save at any TP/PP), :mod:`.layer_reader` (one layer at a
time), :mod:`.megatron_lm` (the live model's logits).
HF side: :mod:`.hf_export` (in memory), :mod:`.stream_hf` (layer by layer), :mod:`.hf_import`
and :mod:`.stream_megatron` (HF or Megatron → Megatron), with :mod:`.safetensors_io`,
:mod:`.tokenizer_export` and :mod:`.model_card`. Every direction is checked by
:mod:`.parity` and published by :mod:`.outputs`.
"""
