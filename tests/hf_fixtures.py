"""Helpers shared by the Hugging Face tests: a perturbed reference model, the in-package HF
model holding its weights, a tiny byte-level BPE tokenizer, and the texts and fresh-process
``AutoTokenizer`` check of the tokenizer export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.convert.hf_config import mm_config_dict
from mm_megatron.convert.mm_layout import reference_to_hf
from mm_megatron.hf.configuration_memory_mosaics import MemoryMosaicsConfig
from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsForCausalLM
from mm_megatron.reference import ReferenceMMModel


def perturbed_reference(cfg: ModelConfig, gate_scale: float = 3.0, seed: int = 0):
    """A reference model whose gates, decays, per-head scalars and logit scale are far from
    their initial values, so that every part of the function shows in the logits."""
    torch.manual_seed(seed)
    ref = ReferenceMMModel(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".W_g." in name or ".W_lam." in name:
                p.mul_(gate_scale)
            elif name.startswith(("embedding", "W_c")):
                p.mul_(10.0)
            elif name.endswith(("_raw", "gamma")):
                p.add_(0.5 * torch.randn_like(p))
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return ref


def hf_model(cfg: ModelConfig, state: dict) -> MemoryMosaicsForCausalLM:
    """The HF model (in-package classes) holding reference-layout weights."""
    model = MemoryMosaicsForCausalLM(MemoryMosaicsConfig(**mm_config_dict(cfg, None, None)))
    model.load_state_dict(reference_to_hf(state), strict=True)
    return model.eval()


def tiny_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer.json trained on a few sentences (specials get ids 0 and 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=60, initial_alphabet=[], special_tokens=["<|begin_of_text|>", "<|end_of_text|>"]
    )
    tok.train_from_iterator(["the cat sat on the mat", "hello world, the end"] * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


CORPUS = [
    "def main(argv):\n    for i in range(10):\n        print(f'{i:03d}', argv[i])\n",
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it?",
    "Ünïcödé têxt: café, naïve, 日本語のテキスト, Привет мир, emoji 🙂 and more.",
    "    indented    code    with    runs    of    spaces\n\n\n\ttabs\tand\tnewlines\r\n",
    "class Foo(Bar):\n    '''Docstring.'''\n    x: int = 0x1F\n    y = [1, 2, 3]\n",
] * 8
SAMPLE = [
    "Héllo wörld — naïve café, 日本語テキスト, emoji 🙂🚀 and ÅÄÖ.",
    "  leading, trailing   and   inner   runs of spaces   ",
    "tabs\tand\nnewlines\n\n\r\n    indented\n\t\tdouble tab",
    "digits 1234567890 3.14159 0x1F 1,000,000 2024-06-01",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))\n",
    "it's they're we'll I'd YOU'RE",
    "x" * 40 + " " * 17 + "y",
    "a",
    "",
]
BLOCKED = ("tiktoken", "sentencepiece", "mm_megatron")
LOAD = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # any import of these fails
from transformers import AutoTokenizer
out = {{}}
for kind, path in json.loads(sys.argv[1]).items():
    tok = AutoTokenizer.from_pretrained(path)
    texts = json.loads(sys.argv[2])
    out[kind] = {{
        "class": type(tok).__name__,
        "plain": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
        "default": [tok(t)["input_ids"] for t in texts],
        "keys": sorted(tok("x").keys()),
        "decoded": tok.decode(tok(texts[0], add_special_tokens=False)["input_ids"]),
        "ids": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
        "tokens": [tok.bos_token, tok.eos_token, tok.pad_token],
        "model_input_names": list(tok.model_input_names),
        "batch": dict(tok(["a b c d", "a"], padding=True)),
    }}
assert not [m for m in sys.modules if m.split(".")[0] in {blocked!r} and sys.modules[m]]
print("RESULT" + json.dumps(out))
"""


def load_in_fresh_process(dirs: dict[str, Path], texts: list[str], tmp: Path) -> dict:
    """AutoTokenizer results in an interpreter where tiktoken, sentencepiece and mm_megatron
    cannot be imported, with no trust_remote_code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "modules"))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD.format(blocked=BLOCKED),
            json.dumps({k: str(v) for k, v in dirs.items()}),
            json.dumps(texts),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])
