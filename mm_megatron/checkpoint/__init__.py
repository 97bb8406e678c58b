"""Our Megatron checkpoints: the run-directory format (:mod:`.format`) and the atomic,
verified save of a model's sharded state (:mod:`.sharded`). The training application
(``pretrain/``) and the converters (:mod:`mm_megatron.convert`) both build on it."""
