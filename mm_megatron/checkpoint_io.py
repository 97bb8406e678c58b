"""Read and write our Megatron checkpoints as full (unsharded) state dicts, on CPU.

A training checkpoint (:mod:`pretrain.checkpointing`: ``<root>/iter_XXXXXXX/`` in torch_dist
format, manifest, ``config.yaml``; ``<root>/latest_checkpointed_iteration.txt``;
``<root>/tokenizer/``) saved at any TP/PP/VPP layout is loaded into a TP=1, PP=1 model in one
process (``dist_checkpointing`` reshards), giving the full Megatron state dict that
:mod:`mm_megatron.weight_layout` and :func:`mm_megatron.hf.export_hf` read.

:func:`save_megatron_checkpoint` writes the opposite: a model-only checkpoint in the same
layout (no optimizer, scheduler or data state), saved from the target TP/PP layout by one
spawned gloo process per rank, usable with ``checkpoint.init_from=`` and by
:func:`load_megatron_checkpoint`. It is written into a temporary sibling directory, checked by
loading it back, and renamed into place only then.

:func:`read_hf_dir` reads a Hugging Face directory written by ``export_hf`` (MM v2 or Llama)
back into a full Megatron state dict and its :class:`~mm_megatron.config.ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.utils._device

from mm_megatron.config import ModelConfig, ParallelConfig, validate_layout
from mm_megatron.config_loading import ConfigError, from_mapping, load_yaml, to_mapping

Tensor = torch.Tensor
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "tokenizer.tiktoken")  # fmt: skip


class ConversionError(RuntimeError):
    """A checkpoint that cannot be read or written as asked; the message names the file."""


@dataclass
class MegatronCheckpoint:
    """A Megatron checkpoint loaded on CPU."""

    path: Path  # the iter_XXXXXXX directory
    cfg: ModelConfig
    state_dict: dict[str, Tensor]  # full TP=1/PP=1 names; vocabulary rows as stored (padded)
    config: dict[str, Any]  # the resolved config.yaml
    iteration: int
    layout: dict[str, int]  # the layout it was saved from (tp, pp, dp)
    tokenizer_files: list[Path]


# --------------------------------------------------------------------------- process group


def init_cpu_process_group() -> None:
    """Make this process a one-rank gloo group with TP=1, PP=1 (idempotent, CPU mode)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mm_megatron.cpu_compat import cpu_mode_enabled, enable_cpu_mode

    if not cpu_mode_enabled():
        # torch caches the factories that ``with torch.device(...)`` redirects on first use;
        # fill that cache before CPU mode wraps them, or meta-device construction (Hugging
        # Face from_pretrained) silently makes real tensors and leaves buffers uninitialised.
        torch.utils._device._device_constructors()
    enable_cpu_mode()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConversionError("checkpoint conversion runs in one process (world size 1)")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(0)


def build_full_model(cfg: ModelConfig, vocab_rows: int, dtype: torch.dtype) -> Any:
    """A TP=1, PP=1 model with ``vocab_rows`` embedding/classifier rows (the stored padding)."""
    from mm_megatron.model import build_model, transformer_config

    init_cpu_process_group()
    build_cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=vocab_rows)
    model = build_model(build_cfg, transformer_config(build_cfg, params_dtype=dtype))
    return model.eval()


def fit_vocab(state_dict: dict[str, Tensor], cfg: ModelConfig, rows: int) -> dict[str, Tensor]:
    """The vocabulary tensors cut or zero-padded to ``rows`` rows (real rows always kept)."""
    if rows < cfg.vocab_size:
        raise ValueError(f"{rows} vocabulary rows cannot hold vocab_size {cfg.vocab_size}")
    out = dict(state_dict)
    for key in VOCAB_KEYS:
        t = state_dict[key][:rows]
        if t.shape[0] < rows:
            t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
        out[key] = t
    return out


# --------------------------------------------------------------------------- loading


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The ``iter_*`` directory to read: ``path`` itself, or the tracker's iteration of a run
    root. Verified against its manifest; errors name the file at fault."""
    from pretrain import checkpointing as ckpt

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: does not exist")
    if (path / ckpt.MANIFEST).is_file() or path.name.startswith("iter_"):
        target = path
    else:
        tracker = path / ckpt.TRACKER
        complete = ckpt.list_checkpoints(path)
        if not tracker.is_file():
            hint = f" (complete: {complete}; pass an iter_* directory)" if complete else ""
            raise ConversionError(f"{path}: no {ckpt.TRACKER}: not a checkpoint directory{hint}")
        try:
            iteration = int(tracker.read_text().strip())
        except ValueError:
            raise ConversionError(f"{tracker}: unreadable tracker "
                                  f"(complete iterations: {complete})") from None  # fmt: skip
        target = ckpt.iteration_dir(path, iteration)
        if not target.is_dir():
            raise ConversionError(f"{tracker}: names iteration {iteration}, but {target.name} "
                                  f"does not exist (complete: {complete})")  # fmt: skip
    problem = ckpt.verify_checkpoint(target)
    if problem is not None:
        raise ConversionError(f"damaged or incomplete checkpoint: {problem}")
    return target


def read_run_config(ckpt_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config (``model:`` section of ``config.yaml``) and the whole mapping."""
    path = ckpt_dir / "config.yaml"
    try:
        data = load_yaml(path)
        if "model" not in data:
            raise ConfigError(f"{path}: no 'model' section")
        return from_mapping(ModelConfig, data["model"], "model"), data
    except ConfigError as err:
        raise ConversionError(str(err) if str(path) in str(err) else f"{path}: {err}") from None


def _check_against_files(template: dict[str, Any], stored: dict[str, Any], where: Path) -> None:
    """Every tensor of the model exists in the checkpoint with the same global shape."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    problems = []
    for item in nested_values(template):
        if not isinstance(item, ShardedTensor):
            continue
        if item.key not in stored:
            problems.append(f"{item.key}: not in the checkpoint")
        elif tuple(stored[item.key].global_shape) != tuple(item.global_shape):
            problems.append(f"{item.key}: {tuple(stored[item.key].global_shape)} in the files, "
                            f"{tuple(item.global_shape)} from the model config")  # fmt: skip
    if problems:
        raise ConversionError(
            f"{where}: the weights do not match the model config {where / 'config.yaml'}: "
            + "; ".join(sorted(set(problems))[:6])
        )


def load_megatron_checkpoint(
    path: str | Path, cfg: ModelConfig | None = None, tokenizer: str | Path | None = None
) -> MegatronCheckpoint:
    """Load a run root (the tracker's iteration) or an ``iter_*`` directory on CPU.

    ``cfg`` replaces the checkpoint's ``config.yaml`` model section. Tokenizer files come from
    ``<root>/tokenizer/`` unless ``tokenizer`` (a file or a directory) is given.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = resolve_checkpoint_dir(path)
    run_cfg, config = read_run_config(ckpt_dir)
    cfg = cfg or run_cfg
    manifest = json.loads((ckpt_dir / "mm_checkpoint.json").read_text())
    init_cpu_process_group()
    for name, read in ((".metadata", dist_checkpointing.load_tensors_metadata),
                       ("common.pt", dist_checkpointing.load_common_state_dict)):  # fmt: skip
        try:
            result = read(str(ckpt_dir))
        except Exception as err:  # noqa: BLE001 - any reader error means a damaged file
            raise ConversionError(f"{ckpt_dir / name}: unreadable ({_first_line(err)})") from err
        if name == ".metadata":
            stored = result
    embed = stored.get(VOCAB_KEYS[0])
    if embed is None:
        raise ConversionError(f"{ckpt_dir}: no {VOCAB_KEYS[0]} in the checkpoint")
    rows = max(embed.global_shape[0], cfg.vocab_size)
    model = build_full_model(cfg, rows, embed.dtype)
    template = {"model": model.sharded_state_dict()}
    _check_against_files(template, stored, ckpt_dir)
    try:
        loaded = dist_checkpointing.load(template, str(ckpt_dir))
        model.load_state_dict(loaded["model"])
    except Exception as err:  # noqa: BLE001
        raise ConversionError(f"{ckpt_dir}: cannot load the model weights "
                              f"({_first_line(err)})") from err  # fmt: skip
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ConversionError(f"{ckpt_dir}: non-finite values in {bad[:4]} (damaged files?)")
    return MegatronCheckpoint(
        path=ckpt_dir, cfg=cfg, state_dict=state, config=config,
        iteration=int(manifest.get("iteration", 0)), layout=manifest.get("layout", {}),
        tokenizer_files=tokenizer_files(tokenizer or ckpt_dir.parent / "tokenizer"),
    )  # fmt: skip


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def tokenizer_files(path: str | Path) -> list[Path]:
    """The tokenizer files in a directory, or a file and the known ones beside it."""
    path = Path(path)
    if path.is_file():
        return [path] + [p for p in tokenizer_files(path.parent) if p.name != path.name]
    return [path / n for n in TOKENIZER_NAMES if (path / n).is_file()]


# --------------------------------------------------------------------------- the live model


class MegatronLM:
    """A TP=1 Megatron model (fp32 on CPU) that computes logits and decodes, without a cache.

    The reference of the converter's parity checks and the ``--megatron-checkpoint`` source of
    ``tools/generate.py`` (``generate`` accepts the keyword arguments it passes).
    """

    def __init__(self, state_dict: dict[str, Tensor], cfg: ModelConfig,
                 bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
        rows = state_dict[VOCAB_KEYS[0]].shape[0]
        self.cfg = cfg
        self.model = build_full_model(cfg, rows, torch.float32)
        missing, unexpected = self.model.load_state_dict(
            {k: v.float() for k, v in state_dict.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConversionError(f"weights do not fit the model: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}")  # fmt: skip
        self.config = SimpleNamespace(bos_token_id=bos_token_id, eos_token_id=eos_token_id)

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, vocab_size]`` (padding removed) of token ids ``[B, T]`` (fp32)."""
        from mm_megatron.memory_math import default_doc_pos
        from mm_megatron.model import document_causal_mask

        tokens = tokens.cpu()
        if self.cfg.arch == "mm":
            out = self.model(tokens)
        else:
            pos = default_doc_pos(tokens.shape[0], tokens.shape[1], tokens.device)
            out = self.model(tokens, pos, document_causal_mask(pos))
        return out[..., : self.cfg.vocab_size].float()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, **_: Any) -> Tensor:  # fmt: skip
        """Greedy or temperature/top-p decoding of one prompt, recomputing the whole sequence
        at every step; stops after EOS. ``attention_mask`` must be all ones."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding is not supported: one unpadded prompt per call")
        seq = input_ids.cpu()
        for _step in range(max_new_tokens):
            last = self.logits(seq)[:, -1]
            if do_sample:
                probs = (last / temperature).softmax(-1)
                ordered, order = probs.sort(-1, descending=True)
                drop = ordered.cumsum(-1) - ordered > top_p
                ordered = ordered.masked_fill(drop, 0.0)
                nxt = order.gather(-1, torch.multinomial(ordered, 1))
            else:
                nxt = last.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            eos = self.config.eos_token_id
            if eos is not None and bool((nxt == eos).all()):
                break
        return seq


def compare_logits(reference: Callable[[Tensor], Tensor], candidate: Callable[[Tensor], Tensor],
                   prompt: Tensor, max_abs_tol: float, kl_tol: float) -> Any:
    """Max |logit difference| and KL(reference || candidate) on ``prompt`` as a
    :class:`~mm_megatron.hf.ParityReport`; raises :class:`~mm_megatron.hf.ParityError` with
    the figures when out of tolerance."""
    from mm_megatron.hf.export import ParityError, ParityReport

    with torch.no_grad():
        ref, got = reference(prompt).float().cpu(), candidate(prompt).float().cpu()
    logp_ref, logp_got = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_got)).sum(-1)
    report = ParityReport(max_abs_diff=(ref - got).abs().max().item(), max_kl=kl.max().item(),
                          mean_kl=kl.mean().item(), cached_max_abs_diff=None,
                          prompt_length=prompt.shape[1])  # fmt: skip
    if not (report.max_abs_diff <= max_abs_tol and report.max_kl <= kl_tol):  # NaN fails too
        raise ParityError(f"converted model differs from the source: {report} "
                          f"(tolerances: max|Δ| {max_abs_tol:g}, KL {kl_tol:g})")  # fmt: skip
    return report


# --------------------------------------------------------------------------- saving


def _save_rank(
    rank: int, world: int, store_file: str, tp: int, pp: int, cfg: ModelConfig, full_file: str,
    root: str, config: dict[str, Any], iteration: int,
) -> None:  # fmt: skip
    """One spawned rank of :func:`save_megatron_checkpoint`."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mm_megatron.cpu_compat import enable_cpu_mode
    from mm_megatron.model import build_model, transformer_config
    from mm_megatron.parallel_layout import load_full_state_dict
    from pretrain import checkpointing as ckpt

    torch.set_num_threads(1)
    enable_cpu_mode()
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world), rank=rank,
                            world_size=world)  # fmt: skip
    try:
        parallel_state.initialize_model_parallel(tp, pp)
        model_parallel_cuda_manual_seed(0)
        from mm_megatron.safetensors_stream import open_tensors

        full = open_tensors(full_file)
        dtype = full[VOCAB_KEYS[0]].dtype
        tconfig = transformer_config(cfg, ParallelConfig(tp, pp), params_dtype=dtype)
        model = build_model(cfg, tconfig, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage())  # fmt: skip
        load_full_state_dict(model, full, tconfig)
        ckpt.save_checkpoint(root, [model], None, None, ckpt.TrainState(iteration=iteration),
                             config, keep_last=None)  # fmt: skip
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` unless ``overwrite`` (before any work is done)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConversionError(f"{out_dir}: exists and is not empty (pass --overwrite)")


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Rename a finished temporary directory to ``out_dir``, replacing an old one."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def save_megatron_checkpoint(
    state_dict: dict[str, Tensor], cfg: ModelConfig, out_dir: str | Path, *,
    tp: int = 1, pp: int = 1, tokenizer: Iterable[str | Path] = (),
    config: dict[str, Any] | None = None, iteration: int = 0, overwrite: bool = False,
    check: Callable[[MegatronCheckpoint], Any] | None = None,
) -> MegatronCheckpoint:  # fmt: skip
    """Write ``state_dict`` (full Megatron names) as a model-only checkpoint at TP=``tp``,
    PP=``pp`` under ``out_dir`` (a run root: ``iter_XXXXXXX/``, tracker, ``tokenizer/``).

    ``config`` is the resolved training config to store (its ``model`` and ``parallel``
    sections are replaced; default: only those). The result is loaded back and compared
    tensor by tensor (and passed to ``check``, which raises to refuse it) before ``out_dir``
    appears; returns that loaded checkpoint.
    """
    import torch.multiprocessing as mp

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    try:
        validate_layout(cfg, ParallelConfig(tp, pp))
    except ConfigError as err:
        raise ConversionError(f"target layout: {err}") from None
    files = [Path(f) for f in tokenizer]
    for f in files:
        if not f.is_file():
            raise ConversionError(f"tokenizer file {f}: not found")
    full = fit_vocab(state_dict, cfg, cfg.padded_vocab_size(tp))
    run_config = dict(config or {})
    run_config["model"] = to_mapping(cfg)
    parallel = dict(run_config.get("parallel") or {})
    parallel.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    virtual_pipeline_model_parallel_size=None)  # fmt: skip
    if tp == 1:
        parallel["sequence_parallel"] = False
    run_config["parallel"] = parallel
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        work = tmp / "work"
        work.mkdir()
        full_file = work / "full.pt"
        torch.save({k: v.contiguous() for k, v in full.items()}, full_file)
        root = tmp / "ckpt"
        args = (tp * pp, str(work / "store"), tp, pp, cfg, str(full_file), str(root), run_config,
                iteration)  # fmt: skip
        try:
            mp.start_processes(_save_rank, args=args, nprocs=tp * pp, start_method="spawn")
        except Exception as err:  # noqa: BLE001 - a rank's traceback, shortened
            last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            raise ConversionError(f"saving at TP={tp} PP={pp} failed: {last}") from err
        shutil.rmtree(work)
        if files:
            (root / "tokenizer").mkdir()
            for f in files:
                shutil.copy2(f, root / "tokenizer" / f.name)
        written = load_megatron_checkpoint(root, cfg)
        compare_state_dicts(written.state_dict, state_dict, cfg)
        if check is not None:
            check(written)
        publish_dir(root, out_dir)
        shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written.path = out_dir / written.path.name
    written.tokenizer_files = [out_dir / "tokenizer" / f.name for f in files]
    return written


def compare_state_dicts(got: dict[str, Tensor], want: dict[str, Tensor], cfg: ModelConfig) -> int:
    """Raise unless both hold the same tensors exactly (vocabulary padding ignored); returns
    the number of tensors compared."""
    if set(got) != set(want):
        raise ConversionError(f"tensor names differ: {sorted(set(got) ^ set(want))[:6]}")
    V = cfg.vocab_size
    for key in want:
        a, b = (got[key][:V], want[key][:V]) if key in VOCAB_KEYS else (got[key], want[key])
        check_same_tensor(key, a, b)
    return len(want)


def check_same_tensor(key: str, written: Tensor, source: Tensor) -> None:
    """Raise unless ``written`` holds exactly ``source``'s values, in the same or a wider
    dtype (Megatron keeps per-head scalars in fp32): the source is widened, never rounded."""
    if written.dtype != source.dtype:
        if torch.promote_types(written.dtype, source.dtype) != written.dtype:
            raise ConversionError(f"{key}: written as {written.dtype}, input {source.dtype}")
        source = source.to(written.dtype)
    if written.shape != source.shape or not torch.equal(written, source):
        raise ConversionError(f"{key}: the written checkpoint differs from the input")


# --------------------------------------------------------------------------- Hugging Face


def _hf_to_model_config(hf: dict[str, Any], where: Path) -> ModelConfig:
    """The ``ModelConfig`` of an exported ``config.json`` (training-only fields get defaults:
    ltm_offset_min = inference m, ltm_offset_max = h)."""
    kind = hf.get("model_type")
    if kind not in ("memory_mosaics", "llama"):
        raise ConversionError(f"{where}: model_type {kind!r} is not memory_mosaics or llama")
    common = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], ffn_hidden_size=hf["intermediate_size"],
        norm_epsilon=hf["rms_norm_eps"], seq_length=hf["max_position_embeddings"],
    )  # fmt: skip
    if kind == "memory_mosaics":
        h, lag, m = hf["short_window"], hf["stm_max_lag"], hf["ltm_offset"]
        spans = {h - 1: "eq10", h: "fig11"}
        if lag not in spans:
            raise ConversionError(f"{where}: stm_max_lag {lag} is neither h-1 nor h (h={h})")
        cfg = ModelConfig(
            arch="mm", num_heads=hf["num_heads"], short_window=h, stm_span=spans[lag],
            ltm_offset_inference=m, ltm_offset_min=m, ltm_offset_max=h,
            long_term_memory=hf["long_term_memory"], **common,
        )  # fmt: skip
    else:
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        unsupported = {"num_key_value_heads": hf.get("num_key_value_heads", heads) != heads,
                       "attention_bias": hf.get("attention_bias", False),
                       "mlp_bias": hf.get("mlp_bias", False),
                       "tie_word_embeddings": hf.get("tie_word_embeddings", False),
                       "rope_type": rope.get("rope_type", "default") != "default",
                       "head_dim": hf.get("head_dim", hf["hidden_size"] // heads)
                       != hf["hidden_size"] // heads}  # fmt: skip
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConversionError(f"{where}: not the transformer baseline's layout ({bad})")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        cfg = ModelConfig(arch="transformer", num_heads=heads, rotary_base=int(theta), **common)
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConversionError(f"{where}: {err}") from None
    return cfg


def _read_safetensors(model_dir: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        names, weight_map = ["model.safetensors"], None
    else:
        raise ConversionError(f"{model_dir}: no model.safetensors(.index.json)")
    tensors: dict[str, Tensor] = {}
    for name in names:
        try:
            part = load_file(str(model_dir / name))
        except (OSError, SafetensorError) as err:
            raise ConversionError(f"{model_dir / name}: cannot read ({err})") from None
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == name}
            if listed != set(part):
                raise ConversionError(f"{model_dir / name}: does not hold the tensors that "
                                      f"{index.name} lists for it")  # fmt: skip
        tensors.update(part)
    return tensors


def _llama_to_megatron(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """``LlamaForCausalLM`` state dict → full Megatron GPT state dict (padded vocabulary)."""
    from mm_megatron.hf.llama_layout import llama_layer_to_megatron

    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"],
           "output_layer.weight": hf["lm_head.weight"]}  # fmt: skip
    for i in range(cfg.num_layers):
        out.update(llama_layer_to_megatron(hf, cfg, i))
    return fit_vocab({k: v.contiguous() for k, v in out.items()}, cfg, cfg.padded_vocab_size())


def _hf_expected_shapes(cfg: ModelConfig, hf_config: dict[str, Any]) -> dict[str, torch.Size]:
    if cfg.arch == "mm":
        from mm_megatron.hf.configuration_memory_mosaics import MemoryMosaicsConfig
        from mm_megatron.hf.export import mm_config_dict
        from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsForCausalLM

        config = MemoryMosaicsConfig(**mm_config_dict(cfg, None, None))
        with torch.device("meta"):
            model = MemoryMosaicsForCausalLM(config)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from mm_megatron.hf.llama_layout import llama_config_dict

        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**llama_config_dict(cfg, None, None)))
    return {k: v.shape for k, v in model.state_dict().items()}


def read_hf_dir(
    model_dir: str | Path, cfg: ModelConfig | None = None
) -> tuple[dict[str, Tensor], ModelConfig, dict[str, Any]]:
    """A Hugging Face directory from ``export_hf`` → (full Megatron state dict, model config,
    its ``config.json``). ``cfg`` replaces the config derived from ``config.json``."""
    from mm_megatron.weight_layout import reference_to_megatron

    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"{config_file}: cannot read ({err})") from None
    cfg = cfg or _hf_to_model_config(hf_config, config_file)
    tensors = _read_safetensors(model_dir)
    expected = _hf_expected_shapes(cfg, hf_config)
    wrong = sorted(set(expected) ^ set(tensors)) + sorted(
        f"{k} {tuple(tensors[k].shape)} != {tuple(s)}"
        for k, s in expected.items() if k in tensors and tensors[k].shape != s)  # fmt: skip
    if wrong:
        raise ConversionError(f"{model_dir}: the weights do not match {config_file.name}: "
                              f"{wrong[:6]}")  # fmt: skip
    if cfg.arch == "mm":
        ref = {("W_c.weight" if k == "lm_head.weight" else k.removeprefix("model.")): v
               for k, v in tensors.items()}  # fmt: skip
        full = reference_to_megatron(ref, cfg)
    else:
        full = _llama_to_megatron(tensors, cfg)
    return {k: v.contiguous() for k, v in full.items()}, cfg, hf_config
