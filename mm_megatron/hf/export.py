"""Export trained weights to a Hugging Face model directory and prove parity on the way.

MM v2 (``arch="mm"``) exports to the self-contained remote-code model of
:mod:`mm_megatron.hf.modeling_memory_mosaics`; the transformer baseline exports to the standard
``LlamaForCausalLM`` (:mod:`mm_megatron.hf.llama_layout`). Weight names in the MM v2 export are
the reference layout's (:class:`mm_megatron.reference.ReferenceMMModel`) under ``model.``,
except the classifier: ``W_c.weight`` → ``lm_head.weight``.

:func:`export_hf` writes into a temporary directory next to ``out_dir``, checks the logits of
the written model against an independent reference (:func:`check_parity`), and only then
renames it to ``out_dir``: a failure leaves nothing at ``out_dir``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mm_megatron.config import ModelConfig
from mm_megatron.hf import model_card
from mm_megatron.hf.decode_parity import DecodeParity, decode_parity
from mm_megatron.hf.llama_layout import (
    llama_config_dict,
    megatron_gpt_logits,
    megatron_gpt_to_llama,
)
from mm_megatron.hf.tokenizer_export import (
    ExportedTokenizer,
    convert_tokenizer,
    find_source,
    write_tokenizer_files,
)

Tensor = torch.Tensor
Reference = Callable[[Tensor], Tensor]
HF_DIR = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_memory_mosaics.py", "cache_memory_mosaics.py",
                     "modeling_memory_mosaics.py")
AUTO_MAP = {
    "AutoConfig": "configuration_memory_mosaics.MemoryMosaicsConfig",
    "AutoModel": "modeling_memory_mosaics.MemoryMosaicsModel",
    "AutoModelForCausalLM": "modeling_memory_mosaics.MemoryMosaicsForCausalLM",
}
DECODE_TOKENS = 24  # greedy steps of the generate() parity (uncached steps cost O(T) each)


class ParityError(AssertionError):
    """The exported model's logits differ from the reference beyond tolerance."""


@dataclass
class ParityReport:
    """Figures of one parity check (logits of the exported model vs the reference)."""

    max_abs_diff: float  # max |logit difference| over the prompt, full forward
    max_kl: float  # max over positions of KL(reference || exported), nats
    mean_kl: float
    cached_max_abs_diff: float | None  # greedy generate() with the cache: step logits vs reference
    prompt_length: int
    decode: DecodeParity | None = None  # greedy decoding through generate(), cache on and off

    def __str__(self) -> str:
        cached = "" if self.decode is None else (
            f", generate() over {self.decode.new_tokens} tokens max|Δ| "
            f"{self.decode.cached_max_abs_diff:.3e} (cache) "
            f"{self.decode.uncached_max_abs_diff:.3e} (no cache)")  # fmt: skip
        return (f"parity on {self.prompt_length} tokens: max|Δlogit| {self.max_abs_diff:.3e}, "
                f"KL(ref||hf) max {self.max_kl:.3e} mean {self.mean_kl:.3e}{cached}")  # fmt: skip


def is_megatron_layout(state_dict: dict[str, Tensor]) -> bool:
    return "embedding.word_embeddings.weight" in state_dict


def untangle_fused_norms(meg: dict[str, Tensor]) -> dict[str, Tensor]:
    """Transformer Engine layer specs fuse the pre-norms into the next linear layer
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``): rename them to the
    local spec's ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``."""
    fused = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}  # fmt: skip
    out = {}
    for key, value in meg.items():
        if key.endswith("_extra_state"):
            continue
        for old, new in fused.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def reference_to_hf(ref: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reference-layout names → names of ``MemoryMosaicsForCausalLM``."""
    return {("lm_head.weight" if k == "W_c.weight" else f"model.{k}"): v for k, v in ref.items()}


def mm_config_dict(cfg: ModelConfig, bos: int | None, eos: int | None,
                   pad: int | None = None) -> dict:
    """Keyword arguments of ``MemoryMosaicsConfig`` for a model config."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_hidden_size,
        short_window=cfg.short_window,
        stm_max_lag=cfg.stm_max_lag,
        ltm_offset=cfg.ltm_offset_inference,
        long_term_memory=cfg.long_term_memory,
        rms_norm_eps=cfg.norm_epsilon,
        max_position_embeddings=cfg.seq_length,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read shard size {size!r} (e.g. 5GB, 500MB, 1048576)")
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "kib": 2**10, "mib": 2**20, "gib": 2**30}  # fmt: skip
    return int(float(match.group(1)) * units[(match.group(2) or "").lower()])


def save_sharded(tensors: dict[str, Tensor], out: Path, max_shard_size: int | str) -> list[str]:
    """Write safetensors shards of at most ``max_shard_size`` bytes (a larger single tensor
    gets a shard of its own) and ``model.safetensors.index.json``. Returns the shard names."""
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t.detach().cpu().contiguous().clone()
        used += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


@dataclass
class ReleaseTokenizer:
    """The exported tokenizer (``None`` without tokenizer files), its BOS, EOS and pad ids, and
    the training datasets they were read from."""

    tok: ExportedTokenizer | None
    bos: int | None
    eos: int | None
    pad: int | None
    datasets: list[model_card.DatasetInfo]


def release_tokenizer(
    files: list[Path], cfg: ModelConfig, bos: int | None, eos: int | None,
    add_bos: bool | None, run_config: Mapping[str, Any] | None,
) -> ReleaseTokenizer:  # fmt: skip
    """The converted tokenizer and the BOS, EOS and pad ids of an export.

    Whether texts get a BOS, and which, follows the training data's ``PREFIX.meta.json``
    (``bos_id``) unless ``add_bos``/``bos`` say otherwise."""
    datasets = model_card.blend_datasets(run_config) if run_config else []
    if add_bos is None:
        add_bos, data_bos = model_card.trained_bos(datasets)
        bos = data_bos if bos is None and add_bos else bos
    source = find_source(files)
    if source is None:
        bos = bos if add_bos is not False else None
        return ReleaseTokenizer(None, bos, eos, eos, datasets)
    tok = convert_tokenizer(source, bos_id=bos, eos_id=eos, add_bos=add_bos)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {source.path}: {tok.vocab_size} ids, more than the model's "
                         f"vocab_size {cfg.vocab_size}")  # fmt: skip
    return ReleaseTokenizer(tok, tok.bos_id, tok.eos_id, tok.pad_id, datasets)


def write_side_files(out: Path, cfg: ModelConfig, side: ReleaseTokenizer,
                     tokenizer_files: list[Path], dtype: torch.dtype) -> set[str]:  # fmt: skip
    """Everything of an export but the weights and the card: ``config.json``, the remote code
    (MM v2), the tokenizer files and ``generation_config.json``. Returns the names written."""
    from transformers import GenerationConfig

    _hf_config(cfg, side.bos, side.eos, dtype, side.pad).to_json_file(str(out / "config.json"))
    if cfg.arch == "mm":
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(HF_DIR / name, out / name)
    written = _write_tokenizer(out, tokenizer_files, side.tok)
    GenerationConfig(bos_token_id=side.bos, eos_token_id=side.eos,
                     pad_token_id=side.pad).save_pretrained(out)  # fmt: skip
    return written


def _check_names(tensors: dict[str, Tensor], expected: dict[str, torch.Size]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tuple(tensors[k].shape)} != {tuple(s)}"
             for k, s in expected.items() if k in tensors and tensors[k].shape != s]  # fmt: skip
    if missing or extra or wrong:
        raise KeyError(f"weights do not match the model: missing {missing[:8]}, "
                       f"unexpected {extra[:8]}, wrong shapes {wrong[:8]}")  # fmt: skip


def mm_reference(ref_state: dict[str, Tensor], cfg: ModelConfig, device: str = "cpu") -> Reference:
    """The plain reference model on these weights (fp32, inference m) as a logits function."""
    from mm_megatron.reference import ReferenceMMModel

    with torch.device("meta"):
        model = ReferenceMMModel(cfg)
    model.load_state_dict({k: v.float() for k, v in ref_state.items()}, assign=True)
    model = model.to(device).eval()
    return lambda tokens: model(tokens.to(device)).float()


def default_prompt(cfg: ModelConfig, length: int | None = None) -> Tensor:
    """A fixed prompt ``[1, T]`` (seeded random ids) long enough to cross h and m."""
    if length is None:
        length = 48 if cfg.arch != "mm" else cfg.stm_max_lag + cfg.ltm_offset_inference + 16
        length = min(length, cfg.seq_length)
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (1, length), generator=g)


def _load_exported(model_dir: Path, device: str) -> torch.nn.Module:
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") == "memory_mosaics":
        from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsForCausalLM as cls
    else:
        from transformers import LlamaForCausalLM as cls
    return cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def check_parity(
    model_dir: str | Path, reference: Reference, prompt: Tensor, *,
    max_abs_tol: float = 1e-3, kl_tol: float = 1e-5, cached: bool = True, device: str = "cpu",
) -> ParityReport:  # fmt: skip
    """Compare the exported model in ``model_dir`` (loaded in fp32) with ``reference``.

    Computes, on ``prompt`` ``[1, T]``: the max |logit difference| of a full forward and KL(p_ref
    || p_hf) per position (max and mean); with ``cached``, greedy decoding through
    ``model.generate`` (the first half of the prompt, then up to :data:`DECODE_TOKENS` new
    tokens), with the cache and without, each step's logits against the reference (see
    :mod:`mm_megatron.hf.decode_parity`). Raises :class:`ParityError` with the figures when a
    figure exceeds its tolerance or cached and uncached decoding chose different tokens.
    """
    model = _load_exported(Path(model_dir), device)
    prompt = prompt.to(device)
    ref = reference(prompt).float().cpu()
    out = model(prompt, use_cache=False).logits.float().cpu()
    logp_ref, logp_hf = ref.log_softmax(-1), out.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_hf)).sum(-1)
    decode = None
    if cached:
        split = max(1, prompt.shape[1] // 2)
        new = min(prompt.shape[1] - split, DECODE_TOKENS)
        decode = decode_parity(model, reference, prompt[:, :split], new)
    report = ParityReport(
        max_abs_diff=(out - ref).abs().max().item(), max_kl=kl.max().item(),
        mean_kl=kl.mean().item(), prompt_length=prompt.shape[1], decode=decode,
        cached_max_abs_diff=None if decode is None else decode.cached_max_abs_diff,
    )  # fmt: skip
    worst = report.max_abs_diff
    if decode is not None:
        worst = max(worst, decode.cached_max_abs_diff, decode.uncached_max_abs_diff)
        if not decode.same_tokens:
            worst = math.inf  # cached and uncached generate() disagree: never publish
    if not (worst <= max_abs_tol and report.max_kl <= kl_tol) or math.isnan(worst):
        raise ParityError(f"exported model differs from the reference: {report} "
                          f"(tolerances: max|Δ| {max_abs_tol:g}, KL {kl_tol:g})")  # fmt: skip
    return report


def export_hf(
    state_dict: dict[str, Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_files: Iterable[str | Path] = (),
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    check: bool = True,
    reference: Reference | None = None,
    prompt: Tensor | None = None,
    max_abs_tol: float = 1e-3,
    kl_tol: float = 1e-5,
    overwrite: bool = False,
    add_bos_token: bool | None = None,
    run_config: Mapping[str, Any] | None = None,
    iteration: int | None = None,
    license_file: str | Path | None = None,
) -> ParityReport | None:
    """Write a Hugging Face model directory for ``state_dict`` and return the parity report.

    Args:
        state_dict: MM v2 weights in the reference layout or a full Megatron state dict; for
            the transformer baseline, a full Megatron GPT state dict.
        cfg: the model config (``arch`` picks MM v2 or Llama).
        out_dir: the directory to create (must not exist, or be empty, unless ``overwrite``).
        tokenizer_files: the training tokenizer (``tokenizer.json`` with its config, a tiktoken
            BPE file or a SentencePiece model), exported as a ``tokenizer.json`` that
            ``AutoTokenizer`` loads alone (:mod:`mm_megatron.hf.tokenizer_export`).
        dtype: dtype of the saved weights (default: as given).
        max_shard_size: bytes per safetensors shard (int, or "5GB"/"500MB").
        bos_token_id, eos_token_id: default: the training data's BOS, the tokenizer's tokens.
        check: run :func:`check_parity` on the written files before publishing them.
        reference: logits function for the check (default: the plain reference model for MM
            v2, :func:`~mm_megatron.hf.llama_layout.megatron_gpt_logits` for the baseline).
        add_bos_token: whether the tokenizer adds BOS (default: as the training data, read from
            the blend's ``PREFIX.meta.json``; else when the tokenizer has a BOS).
        run_config, iteration: the checkpoint's resolved run config and iteration, for the
            model card (tokens trained, data blend) and the BOS default.
        license_file: copied into the directory and named in the model card.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    tokenizer_files = [Path(p) for p in tokenizer_files]
    for path in tokenizer_files:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found")
    if license_file is not None:
        model_card.check_license(license_file)
    side = release_tokenizer(tokenizer_files, cfg, bos_token_id, eos_token_id, add_bos_token,
                             run_config)  # fmt: skip
    tensors, ref_fn = _convert(state_dict, cfg, side.bos, side.eos, dtype, reference)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        weights_dtype = dtype or next(iter(tensors.values())).dtype
        written = write_side_files(tmp, cfg, side, tokenizer_files, weights_dtype)
        save_sharded(tensors, tmp, max_shard_size)
        report = None
        if check:
            prompt = prompt if prompt is not None else default_prompt(cfg)
            report = check_parity(tmp, ref_fn, prompt, max_abs_tol=max_abs_tol, kl_tol=kl_tol)
        write_card(tmp, out_dir.name, cfg, tensors, side, report, reference is None, run_config,
                   iteration, license_file, str(weights_dtype), written)  # fmt: skip
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _convert(
    state_dict: dict[str, Tensor], cfg: ModelConfig, bos: int | None, eos: int | None,
    dtype: torch.dtype | None, reference: Reference | None,
) -> tuple[dict[str, Tensor], Reference]:  # fmt: skip
    """HF tensors (validated against the model's names and shapes) and the parity reference,
    built from the same (dtype-rounded) weights."""
    def cast(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: (v.to(dtype) if dtype is not None else v) for k, v in sd.items()}

    if cfg.arch == "mm":
        from mm_megatron.weight_layout import megatron_to_reference

        ref = (megatron_to_reference(untangle_fused_norms(state_dict), cfg)
               if is_megatron_layout(state_dict) else state_dict)  # fmt: skip
        ref = cast({k: v.detach() for k, v in ref.items()})
        tensors = reference_to_hf(ref)
        ref_fn = reference or (lambda tokens: mm_reference(ref, cfg)(tokens))
    else:
        if not is_megatron_layout(state_dict):
            raise KeyError("the transformer baseline exports from a full Megatron GPT state dict "
                           "(embedding.word_embeddings.weight missing)")  # fmt: skip
        meg = cast({k: v.detach() for k, v in untangle_fused_norms(state_dict).items()})
        tensors = megatron_gpt_to_llama(meg, cfg)
        ref_fn = reference or (lambda tokens: megatron_gpt_logits(meg, cfg, tokens.cpu()))
    _check_names(tensors, _expected_shapes(cfg, bos, eos))
    return tensors, ref_fn


def _hf_config(cfg: ModelConfig, bos: int | None, eos: int | None, dtype: torch.dtype,
               pad: int | None = None) -> object:
    if cfg.arch == "mm":
        from mm_megatron.hf.configuration_memory_mosaics import MemoryMosaicsConfig

        config = MemoryMosaicsConfig(**mm_config_dict(cfg, bos, eos, pad))
        config.auto_map = dict(AUTO_MAP)
        config.architectures = ["MemoryMosaicsForCausalLM"]
    else:
        from transformers import LlamaConfig

        config = LlamaConfig(**llama_config_dict(cfg, bos, eos))
        config.rope_theta = float(cfg.rotary_base)  # transformers 4.x reads only this field
        config.architectures = ["LlamaForCausalLM"]
        config.pad_token_id = pad
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def _expected_shapes(cfg: ModelConfig, bos: int | None, eos: int | None) -> dict[str, torch.Size]:
    if cfg.arch == "mm":
        from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsForCausalLM as cls
    else:
        from transformers import LlamaForCausalLM as cls
    with torch.device("meta"):
        model = cls(_hf_config(cfg, bos, eos, torch.float32))
    return {k: v.shape for k, v in model.state_dict().items()}


def _write_tokenizer(out: Path, files: list[Path], tok: ExportedTokenizer | None) -> set[str]:
    """The converted tokenizer's files; other given files are copied as they are."""
    written = set(write_tokenizer_files(out, tok)) if tok is not None else set()
    for path in files:
        if path.name not in written and path != (tok.source.path if tok else None):
            shutil.copyfile(path, out / path.name)
            written.add(path.name)
    return written


def write_card(
    out: Path, name: str, cfg: ModelConfig, tensors: dict[str, Tensor],
    side: ReleaseTokenizer, report: ParityReport | None, default_reference: bool,
    run_config: Mapping[str, Any] | None, iteration: int | None,
    license_file: str | Path | None, dtype: str, taken: set[str],
) -> None:  # fmt: skip
    """``README.md`` (and the license file) of the export; ``tensors`` may be on the meta
    device (only their shapes are read)."""
    license_name = None
    if license_file is not None:
        taken = taken | {p.name for p in out.iterdir()}
        license_name = model_card.copy_license(license_file, out, taken)
    total, embedding = model_card.parameter_counts(tensors)
    reference = ("the independent reference implementation" if default_reference
                 else "the reference given to the exporter (for the checkpoint converter: the "
                 "training code's Megatron model)")  # fmt: skip
    model_card.write_model_card(
        out, cfg, name=name, num_parameters=total, embedding_parameters=embedding,
        tokenizer=side.tok, parity=report, parity_reference=reference, run_config=run_config,
        iteration=iteration, datasets=side.datasets, license_name=license_name,
        dtype=dtype.removeprefix("torch."),
    )  # fmt: skip


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary directory to ``out_dir`` (replacing an old one)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    mask = _umask()
    tmp.chmod(0o777 & ~mask)  # mkdtemp made it private
    for path in tmp.rglob("*"):  # some writers create their files private (0600) too
        if path.is_file():
            path.chmod(0o666 & ~mask)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
