"""Generate text with an exported MM v2 (or Llama baseline) model in Hugging Face format.

    python tools/generate.py --model exports/mm_small --prompt "Once upon a time" \\
        --max-new-tokens 64 [--no-cache] [--greedy | --temperature 0.8 --top-p 0.95]

The model directory is what ``mm_megatron.convert.hf_export.export_hf`` writes: ``config.json``, the
safetensors shards, the remote-code files of MM v2 and ``tokenizer.json`` (read with the
``tokenizers`` package). A prompt is one document: the BOS token is prepended unless
``--no-bos``. Generated text goes to stdout, timing to stderr.

Model sources are pluggable: each entry of ``SOURCES`` maps a command-line option to a loader
``(path, args) -> (model, tokenizer)``; ``--megatron-checkpoint`` runs a training or converted
Megatron checkpoint directly (``mm_megatron.convert.megatron_lm.MegatronLM``: the training code's
model, fp32 on CPU, no cache; ``--device``, ``--dtype`` and ``--no-cache`` do not apply).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Loader = Callable[[str, argparse.Namespace], tuple[Any, Any]]


def load_hf_dir(path: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """A Hugging Face model directory: the model (remote code trusted) and its tokenizer."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok_file = Path(path) / "tokenizer.json"
    if not tok_file.is_file():
        raise SystemExit(f"{tok_file}: not found (export the model with its tokenizer files)")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    return model.to(args.device).eval(), Tokenizer.from_file(str(tok_file))


def load_megatron_checkpoint(path: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """A Megatron checkpoint (a run root, which gives the tracker's iteration, or an
    ``iter_*`` directory), run by the Megatron model itself: TP=1, fp32, on CPU, recomputing
    the whole sequence at every step (no cache). The tokenizer is the run's
    ``<root>/tokenizer/tokenizer.json``."""
    from tokenizers import Tokenizer

    from mm_megatron.checkpoint.format import run_tokenizer_dir
    from mm_megatron.convert.megatron_io import load_megatron_checkpoint as load
    from mm_megatron.convert.megatron_lm import MegatronLM
    from mm_megatron.convert.outputs import ConversionError
    from mm_megatron.data.tokenizers import HFTokenizer

    try:
        ckpt = load(path)
        tok_file = next((f for f in ckpt.tokenizer_files if f.name == "tokenizer.json"), None)
        if tok_file is None:
            raise ConversionError(f"{run_tokenizer_dir(ckpt.path)}: no tokenizer.json")
        special = HFTokenizer(tok_file)
        model = MegatronLM(ckpt.state_dict, ckpt.cfg, special.bos_id, special.eos_id)
    except ConversionError as err:
        raise SystemExit(f"--megatron-checkpoint: {err}") from None
    return model, Tokenizer.from_file(str(tok_file))


# command-line option (argparse dest) -> loader
SOURCES: dict[str, Loader] = {"model": load_hf_dir, "megatron_checkpoint": load_megatron_checkpoint}


def encode_prompt(tokenizer: Any, text: str, bos: int | None) -> list[int]:
    """Token ids of the prompt, starting with BOS when ``bos`` is given."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([bos] if bos is not None and ids[:1] != [bos] else []) + ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face model directory (from export_hf)")
    src.add_argument(
        "--megatron-checkpoint", help="Megatron checkpoint: a run root or an iter_* directory"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole sequence at every step (for checking the cache)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    if args.top_p != 1.0 and args.temperature is None:
        p.error("--top-p needs --temperature")
    return args


def generate(args: argparse.Namespace) -> tuple[list[int], list[int], str, float]:
    """Run one generation: (prompt ids, new ids, new text, seconds)."""
    source = next(name for name in SOURCES if getattr(args, name, None))
    model, tokenizer = SOURCES[source](getattr(args, source), args)
    bos = None if args.no_bos else model.config.bos_token_id
    prompt = encode_prompt(tokenizer, args.prompt, bos)
    if not prompt:
        raise SystemExit("empty prompt (and no BOS token)")
    torch.manual_seed(args.seed)
    sampling = args.temperature is not None
    kwargs: dict[str, Any] = dict(
        do_sample=sampling, max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache
    )
    if sampling:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=0)
    ids = torch.tensor([prompt], device=args.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    seconds = time.perf_counter() - start
    new = out[0, len(prompt) :].tolist()
    return prompt, new, tokenizer.decode(new, skip_special_tokens=True), seconds


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    prompt, new, text, seconds = generate(args)
    print(args.prompt + text)
    cache = "off" if args.no_cache or args.megatron_checkpoint else "on"
    print(
        f"{len(prompt)} prompt tokens, {len(new)} new tokens in {seconds:.2f} s "
        f"({len(new) / max(seconds, 1e-9):.1f} tokens/s, cache {cache})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
