"""The model card (``README.md``) of a Hugging Face export, and its optional license file.

The card is generated from what the export knows: the weights (parameter counts), the resolved
model config, the checkpoint's run config and iteration (tokens trained, the data blend and
each dataset's ``PREFIX.meta.json``), the tokenizer, the parity figures of the export, the
supported ``transformers`` versions, and the known limits of the format.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mm_megatron.config import ModelConfig
from mm_megatron.config_loading import to_mapping
from mm_megatron.data.blends import BlendError, parse_blend
from mm_megatron.data.indexed import meta_path
from mm_megatron.hf.configuration_memory_mosaics import SUPPORTED_TRANSFORMERS

# Supported transformers versions, unless the model code declares its own range.
EMBEDDING_KEYS = ("model.embedding.weight", "lm_head.weight", "model.embed_tokens.weight")
README = "README.md"
# Names an export may use itself: a license file cannot take them.
RESERVED_NAMES = (
    README,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
)


@dataclass
class DatasetInfo:
    """One dataset of a training blend and its preprocessing metadata (when found)."""

    split: str  # train, valid or test
    weight: float | None  # as written in the blend (None: prefixes alone, equal weights)
    prefix: str
    meta_path: Path
    meta: dict[str, Any] | None


def blend_datasets(run_config: Mapping[str, Any]) -> list[DatasetInfo]:
    """The datasets of the run config's ``data.*_blend`` with their ``PREFIX.meta.json``.

    Relative prefixes are read relative to the current directory; a missing meta file gives
    ``meta=None``, an unreadable one an error naming it.
    """
    data = run_config.get("data") or {}
    out = []
    for split in ("train", "valid", "test"):
        blend = data.get(f"{split}_blend")
        if not blend:
            continue
        try:
            pairs = parse_blend(list(blend))
        except BlendError as err:
            raise ValueError(f"run config data.{split}_blend: {err}") from None
        weighted = not all(isinstance(x, str) for x in blend)
        for weight, prefix in pairs:
            path = Path(meta_path(prefix))
            meta = None
            if path.is_file():
                try:
                    meta = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as err:
                    raise ValueError(f"{path}: not a readable JSON file ({err})") from None
                if not isinstance(meta, dict):
                    raise ValueError(f"{path}: expected a JSON object")
            out.append(DatasetInfo(split, weight if weighted else None, prefix, path, meta))
    return out


def trained_bos(datasets: list[DatasetInfo]) -> tuple[bool | None, int | None]:
    """Whether the training documents began with a BOS, and its id, from the train datasets'
    metadata; ``(None, None)`` when no metadata says, or when they disagree."""
    ids = {d.meta.get("bos_id") for d in datasets if d.split == "train" and d.meta is not None}
    if len(ids) != 1:
        return None, None
    (bos,) = ids
    return (bos is not None), bos


def tokens_trained(run_config: Mapping[str, Any] | None, iteration: int | None) -> int | None:
    """``iteration`` × global batch size × sequence length, when all are known."""
    if not run_config or iteration is None:
        return None
    gbs = (run_config.get("train") or {}).get("global_batch_size")
    seq = (run_config.get("model") or {}).get("seq_length")
    if not isinstance(gbs, int) or not isinstance(seq, int):
        return None
    return iteration * gbs * seq


def planned_tokens(run_config: Mapping[str, Any] | None) -> int | None:
    """The run length in tokens (``train.tokens``, or ``train.iters`` × batch × sequence)."""
    train = (run_config or {}).get("train") or {}
    if isinstance(train.get("tokens"), int):
        return train["tokens"]
    return tokens_trained(run_config, train.get("iters"))


def supported_transformers() -> str:
    """The transformers range the shipped model code declares (and checks at load)."""
    return SUPPORTED_TRANSFORMERS


def check_license(path: str | Path, taken: set[str] | frozenset[str] = frozenset()) -> Path:
    """The license file ``path``, checked to be a file whose name no exported file takes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"license file {path} not found (or not a file)")
    if path.name in taken or path.name in RESERVED_NAMES or path.suffix in (".py", ".safetensors"):
        raise ValueError(
            f"license file {path}: its name collides with an exported file "
            f"({path.name}); rename it (e.g. LICENSE)"
        )
    return path


def copy_license(path: str | Path, out: Path, taken: set[str]) -> str:
    """Copy the license file into ``out`` under its own name; returns that name."""
    path = check_license(path, taken)
    shutil.copyfile(path, out / path.name)
    return path.name


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit} ({n:,})"
    return f"{n:,}"


def _limits(cfg: ModelConfig, tokenizer: Any) -> list[str]:
    limits = []
    if cfg.arch == "mm":
        limits += [
            "Loading needs `trust_remote_code=True`: the model code ships in this directory "
            "(`modeling_memory_mosaics.py`, `cache_memory_mosaics.py`, "
            "`configuration_memory_mosaics.py`; torch and "
            "transformers only).",
            "A row is one document: packed multi-document rows are refused; prompts are "
            "padded on the left to generate (right padding is for training and scoring).",
            "The cache cannot be cropped, so assisted/speculative decoding is not supported; "
            "there is no static or compilable cache.",
            "The prefill builds a dense [T, T] mask: prefill long prompts in chunks "
            "(`generate(..., prefill_chunk_size=2048)`).",
        ]
    limits.append(f"Trained on sequences of {cfg.seq_length} tokens; longer contexts are untested.")
    if tokenizer is not None:
        limits.append(
            "Special-token strings inside a text (e.g. "
            f"`{tokenizer.eos_token or tokenizer.bos_token}`) were plain text in "
            "training; this tokenizer reads them as the special tokens."
        )
        if tokenizer.source.kind == "sentencepiece":
            limits.append(
                "Converted from a SentencePiece model: for Unigram models, pieces "
                "whose scores tie exactly may split differently."
            )
    return limits


def render_model_card(
    cfg: ModelConfig,
    *,
    name: str,
    num_parameters: int,
    embedding_parameters: int,
    tokenizer: Any = None,
    parity: Any = None,
    parity_reference: str = "",
    run_config: Mapping[str, Any] | None = None,
    iteration: int | None = None,
    datasets: list[DatasetInfo] | None = None,
    license_name: str | None = None,
    transformers_range: str | None = None,
    dtype: str = "",
) -> str:
    """The text of ``README.md`` (YAML front matter, then Markdown)."""
    mm = cfg.arch == "mm"
    front: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["memory-mosaics" if mm else "llama", "causal-lm"],
    }
    if license_name:
        front.update(license="other", license_name="custom", license_link=license_name)
    rng = transformers_range or supported_transformers()
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    lines.append(
        "A Memory Mosaics v2 language model (arXiv 2507.03285), exported with its model code."
        if mm
        else "A transformer baseline language model in the Llama format "
        "(`LlamaForCausalLM`, no remote code)."
    )
    remote = ", trust_remote_code=True" if mm else ""
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})',
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        'out = model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=64)',
        "print(tok.decode(out[0]))",
        "```",
        "",
        f"Supported transformers versions: `{rng}`.",
        "",
    ]

    lines += [
        "## Model",
        "",
        f"* Parameters: {_count(num_parameters)}, of which embedding and classifier "
        f"{_count(embedding_parameters)}.",
        f"* Weights: {dtype or 'as trained'}, safetensors.",
        f"* Vocabulary: {cfg.vocab_size} tokens; training sequence length {cfg.seq_length}.",
        "",
        "Resolved model config:",
        "",
        "```yaml",
        yaml.safe_dump({"model": to_mapping(cfg)}, sort_keys=False).rstrip(),
        "```",
        "",
    ]

    lines += ["## Training", ""]
    done, planned = tokens_trained(run_config, iteration), planned_tokens(run_config)
    if done is not None:
        train = (run_config or {}).get("train") or {}
        plan = f" of {_count(planned)} planned" if planned else ""
        lines.append(
            f"* Tokens trained: {_count(done)}{plan}: iteration {iteration} × global "
            f"batch {train.get('global_batch_size')} × sequence length "
            f"{cfg.seq_length}."
        )
    elif iteration is not None:
        lines.append(f"* Iteration {iteration}; tokens trained unknown (no run config).")
    else:
        lines.append("* Tokens trained: unknown (exported without a run config).")
    lines += _blend_lines(datasets or [], run_config is not None)
    lines += _tokenizer_lines(tokenizer, trained_bos(datasets or [])[0] is not None)
    lines += _parity_lines(parity, parity_reference)
    lines += ["## Known limits", "", *[f"* {item}" for item in _limits(cfg, tokenizer)], ""]
    if license_name:
        lines += ["## License", "", f"See [{license_name}]({license_name}).", ""]
    return "\n".join(lines)


def _blend_lines(datasets: list[DatasetInfo], have_config: bool) -> list[str]:
    if not datasets:
        why = "no data blend in the run config" if have_config else "exported without a run config"
        return [f"* Data: not recorded ({why}).", ""]
    lines = [
        "",
        "Data blend (weights are per-sample probabilities before normalisation):",
        "",
        "| split | weight | dataset | documents | tokens | tokenizer | BOS id | EOS id |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in datasets:
        m = d.meta or {}
        weight = "equal" if d.weight is None else f"{d.weight:g}"
        cells = [
            d.split,
            weight,
            f"`{d.prefix}`",
            m.get("documents", "?"),
            m.get("tokens", "?"),
            f"`{m['tokenizer']}`" if "tokenizer" in m else "?",
            m.get("bos_id", "?"),
            m.get("eos_id", "?"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for d in datasets:
        if d.meta is None:
            lines += [f"`{d.meta_path.name}`: not found.", ""]
        else:
            lines += [
                "<details>",
                f"<summary><code>{d.meta_path.name}</code></summary>",
                "",
                "```json",
                json.dumps(d.meta, indent=2, sort_keys=True),
                "```",
                "",
                "</details>",
                "",
            ]
    return lines


def _tokenizer_lines(tok: Any, bos_recorded: bool) -> list[str]:
    lines = ["## Tokenizer", ""]
    if tok is None:
        return lines + ["No tokenizer was exported.", ""]
    source = {
        "hf": "the training `tokenizer.json` (post-processor set)",
        "tiktoken": "a tiktoken BPE file (Llama-3 format)",
        "sentencepiece": "a SentencePiece model",
    }[tok.source.kind]
    origin = (
        "as in the training data"
        if bos_recorded
        else "assumed: no dataset metadata records whether the training documents began with it"
    )
    bos = (
        f"BOS `{tok.bos_token}` (id {tok.bos_id}) is added before every text ({origin})"
        if tok.add_bos
        else "no BOS is added (the training documents had none)"
    )
    lines += [
        f"* `tokenizer.json` from {source}, `{tok.source.path.name}`; "
        f"`AutoTokenizer` loads it with no extra packages.",
        f"* {tok.vocab_size} ids; {bos}; EOS `{tok.eos_token}` (id {tok.eos_id}).",
        f"* Pad: {tok.pad_note}.",
        "",
    ]
    return lines


def _parity_lines(report: Any, reference: str) -> list[str]:
    lines = ["## Export parity", ""]
    if report is None:
        return lines + ["The parity check was skipped for this export.", ""]
    lines += [
        f"Logits of this directory (loaded in fp32) against {reference or 'a reference'}, "
        f"on a fixed prompt of {report.prompt_length} tokens, on the same weights:",
        "",
        "| figure | value |",
        "|---|---|",
        f"| max abs. logit difference, full forward | {report.max_abs_diff:.3e} |",
        f"| max KL(reference ‖ export) per position, nats | {report.max_kl:.3e} |",
        f"| mean KL | {report.mean_kl:.3e} |",
    ]
    if report.cached_max_abs_diff is not None:
        lines.append(
            f"| max abs. logit difference, cached decoding | {report.cached_max_abs_diff:.3e} |"
        )
    return lines + [""]


def parameter_counts(tensors: Mapping[str, Any]) -> tuple[int, int]:
    """(all parameters, embedding + classifier parameters) of the exported weights."""
    total = sum(math.prod(t.shape) for t in tensors.values())
    embedding = sum(math.prod(t.shape) for k, t in tensors.items() if k in EMBEDDING_KEYS)
    return total, embedding


def write_model_card(out: Path, cfg: ModelConfig, **kwargs: Any) -> Path:
    """Write ``README.md`` into ``out`` (arguments of :func:`render_model_card`)."""
    path = out / README
    path.write_text(render_model_card(cfg, **kwargs), encoding="utf-8")
    return path
