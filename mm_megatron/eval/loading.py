"""Model loading shared by every evaluation suite.

A model comes from a Hugging Face export directory (MM v2 remote code or the baseline's
``LlamaForCausalLM``) or from a Megatron checkpoint, which is converted in memory with
``mm_megatron.convert.hf_export.export_hf`` into a temporary directory (removed at exit) and
then loaded the same way, so that every suite runs the same cached HF model on CPU or GPU.
``--no-ltm`` removes the long-term memory after loading through
``mm_megatron.eval.ltm_ablation.apply_ltm_removal``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class EvalError(Exception):
    """A user error (bad option, unreadable file); the CLI prints it and exits with status 2."""


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options that select and place the model (shared by every suite)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face export directory (from export_hf)")
    src.add_argument(
        "--megatron-checkpoint",
        help="Megatron checkpoint: a run root or an iter_* directory; converted "
        "to a temporary HF directory in memory",
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json or its directory, for a Megatron "
        "checkpoint without a tokenizer/ directory",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument(
        "--no-ltm",
        action="store_true",
        help="remove the long-term memory after loading (MM v2 only)",
    )
    parser.add_argument(
        "--label", help="name of the model in result tables (default: the directory name)"
    )


def validate_model_args(args: argparse.Namespace) -> None:
    """Check the model options before any work; raise EvalError naming the option."""
    if args.model is not None:
        path = Path(args.model)
        if not path.is_dir():
            raise EvalError(f"--model {path}: not a directory")
        if not (path / "config.json").is_file():
            raise EvalError(f"--model {path}: no config.json (not a Hugging Face export)")
    if args.megatron_checkpoint is not None and not Path(args.megatron_checkpoint).is_dir():
        raise EvalError(f"--megatron-checkpoint {args.megatron_checkpoint}: not a directory")
    if args.tokenizer is not None:
        if args.model is not None:
            raise EvalError(
                "--tokenizer applies to --megatron-checkpoint only (an export "
                "carries its tokenizer)"
            )
        if not Path(args.tokenizer).exists():
            raise EvalError(f"--tokenizer {args.tokenizer}: not found")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: CUDA is not available")


@dataclass
class LoadedModel:
    """A model ready for evaluation, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    hf_dir: Path
    source: str
    kind: str  # "hf" | "megatron"
    arch: str  # "mm" | "llama" | another model_type
    label: str
    no_ltm: bool = False
    _tmp: Path | None = field(default=None, repr=False)

    @property
    def bos_id(self) -> int | None:
        """The BOS id prepended to every prompt (a prompt is one document)."""
        bos = getattr(self.model.config, "bos_token_id", None)
        return bos if bos is not None else self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        eos = getattr(self.model.config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return eos if eos is not None else self.tokenizer.eos_token_id

    def describe(self) -> dict[str, Any]:
        """What goes into a result file's ``model`` entry."""
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "label": self.label,
            "source": self.source,
            "kind": self.kind,
            "arch": self.arch,
            "no_ltm": self.no_ltm,
            "parameters": params,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(self.model.parameters()).device),
        }

    def close(self) -> None:
        """Remove the temporary export of a Megatron checkpoint."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def load_tokenizer(hf_dir: Path) -> Any:
    """The export's fast tokenizer (from ``tokenizer.json``; BOS/EOS from its config)."""
    from transformers import PreTrainedTokenizerFast

    tok_file = hf_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise EvalError(f"{tok_file}: not found (export the model with its tokenizer files)")
    kwargs: dict[str, Any] = {}
    tok_config = hf_dir / "tokenizer_config.json"
    if tok_config.is_file():
        conf = json.loads(tok_config.read_text())
        kwargs = {
            k: conf[k]
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
            if isinstance(conf.get(k), str)
        }
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_hf_dir(hf_dir: Path, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """Model (remote code trusted, eval mode, on ``device``) and tokenizer of an export."""
    from transformers import AutoModelForCausalLM

    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            hf_dir, trust_remote_code=True, dtype=torch_dtype
        )
    except (OSError, ValueError) as err:
        raise EvalError(f"{hf_dir}: cannot load the model ({err})") from err
    return model.to(device).eval(), load_tokenizer(hf_dir)


def megatron_to_hf(path: str | Path, out_dir: Path, tokenizer: str | None = None) -> Path:
    """Convert a Megatron checkpoint into an HF directory ``out_dir`` (with the parity check
    of ``export_hf``) and return it."""
    from mm_megatron.convert.hf_export import export_hf
    from mm_megatron.convert.megatron_io import load_megatron_checkpoint
    from mm_megatron.convert.outputs import ConversionError
    from mm_megatron.convert.parity import ParityError

    try:
        ckpt = load_megatron_checkpoint(path, tokenizer=tokenizer)
        if not any(f.name == "tokenizer.json" for f in ckpt.tokenizer_files):
            raise EvalError(
                f"--megatron-checkpoint {path}: no tokenizer.json in the run's "
                "tokenizer/ directory; pass --tokenizer"
            )
        export_hf(ckpt.state_dict, ckpt.cfg, out_dir, ckpt.tokenizer_files)
    except (ConversionError, ParityError) as err:
        raise EvalError(f"--megatron-checkpoint {path}: {err}") from err
    return out_dir


def apply_no_ltm(model: Any) -> None:
    """Remove the long-term memory (``--no-ltm``) with
    ``mm_megatron.eval.ltm_ablation.apply_ltm_removal``."""
    try:
        module = importlib.import_module("mm_megatron.eval.ltm_ablation")
    except ModuleNotFoundError as err:
        if err.name != "mm_megatron.eval.ltm_ablation":
            raise
        raise EvalError(
            "--no-ltm: not available (mm_megatron.eval.ltm_ablation is not installed)"
        ) from None
    fn = getattr(module, "apply_ltm_removal", None)
    if fn is None:
        raise EvalError(
            "--no-ltm: not available (mm_megatron.eval.ltm_ablation has no apply_ltm_removal)"
        )
    fn(model)


def load_model(args: argparse.Namespace) -> LoadedModel:
    """Load the model that the options of :func:`add_model_args` select."""
    validate_model_args(args)
    tmp: Path | None = None
    if args.model is not None:
        hf_dir, kind, source = Path(args.model), "hf", str(args.model)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="mm_eval_export_"))
        source, kind = str(args.megatron_checkpoint), "megatron"
        try:
            hf_dir = megatron_to_hf(source, tmp / "model", args.tokenizer)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        model, tok = load_hf_dir(hf_dir, args.device, args.dtype)
        arch = json.loads((hf_dir / "config.json").read_text()).get("model_type", "?")
        arch = "mm" if arch == "memory_mosaics" else arch
        if args.no_ltm:
            if arch != "mm":
                raise EvalError(
                    f"--no-ltm: the model is {arch}, not MM v2 (no long-term memory to remove)"
                )
            apply_no_ltm(model)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    label = args.label or Path(source.rstrip("/")).name + (" (no LTM)" if args.no_ltm else "")
    return LoadedModel(model, tok, hf_dir, source, kind, arch, label, args.no_ltm, tmp)
