"""Tiny exported models for the evaluation tests: MM v2 (remote code) and the Llama baseline,
both with a byte-level tokenizer that encodes any text (digits, UUIDs, punctuation)."""

from __future__ import annotations

from pathlib import Path

import torch
from hf_fixtures import perturbed_reference
from mm_testing import tiny_config

VOCAB = 320  # >= the tokenizer's 300 ids; a multiple of 16
TEXT = [
    "The special number for silver-lantern is 1234567.",
    "the cat sat on the mat",
    "Question: What is the answer? Answer: The answer is 42.",
    "VAR ABCDE = 12345.",
    "1. bako 2. tumi 3. rasi",
    "Document 1:\nThe river runs slowly toward the sea.",
]


def byte_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer.json (300 ids; specials <|begin_of_text|> = 0,
    <|end_of_text|> = 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def mm_export(tmp: Path, seed: int = 0) -> Path:
    """A tiny MM v2 export (2 layers, d = 32, h = 8, m = 3; perturbed weights)."""
    from mm_megatron.convert.hf_export import export_hf

    cfg = tiny_config(vocab_size=VOCAB, seq_length=128)
    ref = perturbed_reference(cfg, seed=seed)
    out = tmp / "mm"
    export_hf(ref.state_dict(), cfg, out, [byte_tokenizer(tmp / "tok")])
    return out


def llama_export(tmp: Path, seed: int = 0) -> Path:
    """A tiny Llama export in the baseline's layout (no GQA, untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked distributions, like a trained model
    out = tmp / "llama"
    model.save_pretrained(out)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(byte_tokenizer(tmp / "tok_llama")),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
    )
    tok.save_pretrained(out)
    return out
