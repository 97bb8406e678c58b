"""Export trained weights to a Hugging Face model directory and prove parity on the way.

MM v2 (``arch="mm"``) exports to the self-contained remote-code model of
:mod:`mm_megatron.hf.modeling_memory_mosaics`; the transformer baseline exports to the standard
``LlamaForCausalLM`` (:mod:`mm_megatron.convert.llama_layout`). Weight names in the MM v2
export are the reference layout's (:class:`mm_megatron.reference.ReferenceMMModel`) under
``model.``, except the classifier: ``W_c.weight`` → ``lm_head.weight``
(:mod:`mm_megatron.convert.mm_layout`).

:func:`export_hf` writes into a temporary directory next to ``out_dir``, checks the logits of
the written model against an independent reference
(:func:`~mm_megatron.convert.parity.check_parity`), and only then renames it to ``out_dir``:
a failure leaves nothing at ``out_dir``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from mm_megatron.config import ModelConfig
from mm_megatron.convert import model_card
from mm_megatron.convert.hf_config import expected_hf_shapes, hf_config
from mm_megatron.convert.llama_layout import megatron_gpt_to_llama
from mm_megatron.convert.megatron_state import is_megatron_layout, untangle_fused_norms
from mm_megatron.convert.mm_layout import megatron_to_reference, reference_to_hf
from mm_megatron.convert.outputs import (
    check_output_dir,
    make_temporary,
    publish_dir,
)
from mm_megatron.convert.parity import ParityReport, Reference, check_parity, default_prompt
from mm_megatron.convert.references import megatron_gpt_logits, mm_reference
from mm_megatron.convert.safetensors_io import save_sharded
from mm_megatron.convert.tokenizer_export import (
    ExportedTokenizer,
    convert_tokenizer,
    find_source,
    write_tokenizer_files,
)

Tensor = torch.Tensor
HF_DIR = Path(__file__).resolve().parents[1] / "hf"
REMOTE_CODE_FILES = (
    "configuration_memory_mosaics.py",
    "cache_memory_mosaics.py",
    "modeling_memory_mosaics.py",
)


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
    files: list[Path],
    cfg: ModelConfig,
    bos: int | None,
    eos: int | None,
    add_bos: bool | None,
    run_config: Mapping[str, Any] | None,
) -> ReleaseTokenizer:
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
        raise ValueError(
            f"tokenizer {source.path}: {tok.vocab_size} ids, more than the model's "
            f"vocab_size {cfg.vocab_size}"
        )
    return ReleaseTokenizer(tok, tok.bos_id, tok.eos_id, tok.pad_id, datasets)


def write_side_files(
    out: Path,
    cfg: ModelConfig,
    side: ReleaseTokenizer,
    tokenizer_files: list[Path],
    dtype: torch.dtype,
) -> set[str]:
    """Everything of an export but the weights and the card: ``config.json``, the remote code
    (MM v2), the tokenizer files and ``generation_config.json``. Returns the names written."""
    hf_config(cfg, side.bos, side.eos, dtype, side.pad).to_json_file(str(out / "config.json"))
    if cfg.arch == "mm":
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(HF_DIR / name, out / name)
    written = _write_tokenizer(out, tokenizer_files, side.tok)
    GenerationConfig(
        bos_token_id=side.bos, eos_token_id=side.eos, pad_token_id=side.pad
    ).save_pretrained(out)
    return written


def check_hf_names(tensors: dict[str, Tensor], expected: dict[str, torch.Size]) -> None:
    """Raise KeyError unless ``tensors`` has exactly the expected names and shapes."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} != {tuple(s)}"
        for k, s in expected.items()
        if k in tensors and tensors[k].shape != s
    ]
    if missing or extra or wrong:
        raise KeyError(
            f"weights do not match the model: missing {missing[:8]}, "
            f"unexpected {extra[:8]}, wrong shapes {wrong[:8]}"
        )


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
            ``AutoTokenizer`` loads alone (:mod:`mm_megatron.convert.tokenizer_export`).
        dtype: dtype of the saved weights (default: as given).
        max_shard_size: bytes per safetensors shard (int, or "5GB"/"500MB").
        bos_token_id, eos_token_id: default: the training data's BOS, the tokenizer's tokens.
        check: run :func:`check_parity` on the written files before publishing them.
        reference: logits function for the check (default: the plain reference model for MM
            v2, :func:`~mm_megatron.convert.references.megatron_gpt_logits` for the baseline).
        add_bos_token: whether the tokenizer adds BOS (default: as the training data, read from
            the blend's ``PREFIX.meta.json``; else when the tokenizer has a BOS).
        run_config, iteration: the checkpoint's resolved run config and iteration, for the
            model card (tokens trained, data blend) and the BOS default.
        license_file: copied into the directory and named in the model card.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    tokenizer_files = [Path(p) for p in tokenizer_files]
    for path in tokenizer_files:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found")
    if license_file is not None:
        model_card.check_license(license_file)
    side = release_tokenizer(
        tokenizer_files, cfg, bos_token_id, eos_token_id, add_bos_token, run_config
    )
    tensors, ref_fn = _convert(state_dict, cfg, side.bos, side.eos, dtype, reference)
    tmp = make_temporary(out_dir)
    try:
        weights_dtype = dtype or next(iter(tensors.values())).dtype
        written = write_side_files(tmp, cfg, side, tokenizer_files, weights_dtype)
        save_sharded(tensors, tmp, max_shard_size)
        report = None
        if check:
            prompt = prompt if prompt is not None else default_prompt(cfg)
            report = check_parity(tmp, ref_fn, prompt, max_abs_tol=max_abs_tol, kl_tol=kl_tol)
        write_card(
            tmp,
            out_dir.name,
            cfg,
            tensors,
            side,
            report,
            reference is None,
            run_config,
            iteration,
            license_file,
            str(weights_dtype),
            written,
        )
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _convert(
    state_dict: dict[str, Tensor],
    cfg: ModelConfig,
    bos: int | None,
    eos: int | None,
    dtype: torch.dtype | None,
    reference: Reference | None,
) -> tuple[dict[str, Tensor], Reference]:
    """HF tensors (validated against the model's names and shapes) and the parity reference,
    built from the same (dtype-rounded) weights."""

    def cast(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: (v.to(dtype) if dtype is not None else v) for k, v in sd.items()}

    if cfg.arch == "mm":
        ref = (
            megatron_to_reference(untangle_fused_norms(state_dict), cfg)
            if is_megatron_layout(state_dict)
            else state_dict
        )
        ref = cast({k: v.detach() for k, v in ref.items()})
        tensors = reference_to_hf(ref)
        ref_fn = reference or (lambda tokens: mm_reference(ref, cfg)(tokens))
    else:
        if not is_megatron_layout(state_dict):
            raise KeyError(
                "the transformer baseline exports from a full Megatron GPT state dict "
                "(embedding.word_embeddings.weight missing)"
            )
        meg = cast({k: v.detach() for k, v in untangle_fused_norms(state_dict).items()})
        tensors = megatron_gpt_to_llama(meg, cfg)
        ref_fn = reference or (lambda tokens: megatron_gpt_logits(meg, cfg, tokens.cpu()))
    check_hf_names(tensors, expected_hf_shapes(cfg))
    return tensors, ref_fn


def _write_tokenizer(out: Path, files: list[Path], tok: ExportedTokenizer | None) -> set[str]:
    """The converted tokenizer's files; other given files are copied as they are."""
    written = set(write_tokenizer_files(out, tok)) if tok is not None else set()
    for path in files:
        if path.name not in written and path != (tok.source.path if tok else None):
            shutil.copyfile(path, out / path.name)
            written.add(path.name)
    return written


def write_card(
    out: Path,
    name: str,
    cfg: ModelConfig,
    tensors: dict[str, Tensor],
    side: ReleaseTokenizer,
    report: ParityReport | None,
    default_reference: bool,
    run_config: Mapping[str, Any] | None,
    iteration: int | None,
    license_file: str | Path | None,
    dtype: str,
    taken: set[str],
) -> None:
    """``README.md`` (and the license file) of the export; ``tensors`` may be on the meta
    device (only their shapes are read)."""
    license_name = None
    if license_file is not None:
        taken = taken | {p.name for p in out.iterdir()}
        license_name = model_card.copy_license(license_file, out, taken)
    total, embedding = model_card.parameter_counts(tensors)
    reference = (
        "the independent reference implementation"
        if default_reference
        else "the reference given to the exporter (for the checkpoint converter: the "
        "training code's Megatron model)"
    )
    model_card.write_model_card(
        out,
        cfg,
        name=name,
        num_parameters=total,
        embedding_parameters=embedding,
        tokenizer=side.tok,
        parity=report,
        parity_reference=reference,
        run_config=run_config,
        iteration=iteration,
        datasets=side.datasets,
        license_name=license_name,
        dtype=dtype.removeprefix("torch."),
    )
