"""Memory Mosaics v2 as Megatron-Core layers.

Paper: "Memory Mosaics at scale", Zhang & Bottou, arXiv 2507.03285.

The packages follow the data flow, corpus → dataset → model → checkpoint → release:

- :mod:`mm_megatron.data`: corpus readers, tokenizers, preprocessing into Megatron's indexed
  datasets (``.bin``/``.idx``), blends and provenance.
- The model: :mod:`.config` (typed model and layout config), :mod:`.model` (builders on
  Megatron-Core's ``GPTModel``), :mod:`.specs` and :mod:`.layers` (the MM v2 block as
  ModuleSpec layers), :mod:`.ops` (memory kernels beside their literal references),
  :mod:`.memory_math` and :mod:`.init_rules` (shared equations and Table 6 initialisation),
  :mod:`.reference` (the plain, single-process statement of the math).
- :mod:`mm_megatron.checkpoint`: the run-directory format and the atomic sharded save.
- :mod:`mm_megatron.convert`: conversion and release (Megatron ↔ Hugging Face, with parity).
- :mod:`mm_megatron.hf`: only the files copied into a Hugging Face export.
- :mod:`mm_megatron.eval`: evaluation of released or training checkpoints.

The training application (``pretrain/``) builds on this package; nothing here imports it.
"""
