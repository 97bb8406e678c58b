"""Hugging Face export: the HF model computes the reference model's function (full forward,
prefill + cached steps, left padding), the exported directory loads with transformers alone,
a failed export leaves nothing behind, and the Llama export of the baseline matches Megatron."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_fixtures import hf_model, perturbed_reference, tiny_tokenizer
from mm_testing import tiny_config
from mp_harness import run_ranks

from mm_megatron.config import ModelConfig
from mm_megatron.convert.hf_export import export_hf
from mm_megatron.convert.mm_layout import reference_to_megatron
from mm_megatron.convert.parity import ParityError
from mm_megatron.convert.references import megatron_gpt_logits

pytestmark = pytest.mark.hf


CONFIGS = {
    "default": {},
    "without_ltm": {"long_term_memory": False},
    "fig11_span": {"stm_span": "fig11", "ltm_offset_inference": 8},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_logits_equal_reference(name):
    """Same weights → same logits: fp32 to rounding, fp64 to 1e-10; prompts longer than h, m."""
    cfg = tiny_config(seq_length=64, **CONFIGS[name])
    ref = perturbed_reference(cfg)
    hf = hf_model(cfg, ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens)
        torch.testing.assert_close(hf(tokens, use_cache=False).logits, want, rtol=1e-5, atol=1e-4)
        got64 = hf.double()(tokens, use_cache=False).logits
        torch.testing.assert_close(got64, ref.double()(tokens), rtol=0, atol=1e-10)


def test_cached_forward_equals_reference():
    """Prefill + single tokens, and uneven multi-token chunks on a non-empty cache, give the
    reference logits at every position."""
    cfg = tiny_config(seq_length=64)
    ref = perturbed_reference(cfg)
    hf = hf_model(cfg, ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(tokens)
        for pieces in ([1] * 40, [5] + [1] * 35, [3, 1, 9, 2, 17, 1, 7]):
            cache, logits, t = None, [], 0
            for n in pieces:
                out = hf(tokens[:, t : t + n], past_key_values=cache, use_cache=True)
                cache, t = out.past_key_values, t + n
                logits.append(out.logits)
            assert cache.get_seq_length() == 40
            torch.testing.assert_close(torch.cat(logits, 1), want, rtol=1e-5, atol=1e-4)


def test_stable_key_scan_with_extreme_gates():
    """Gates e^{W_g x} far outside fp32's range: the literal fp32 recurrence breaks, the HF
    model's log-scale state stays within 1e-3 of the fp64 reference."""
    cfg = tiny_config(seq_length=64)
    ref = perturbed_reference(cfg, gate_scale=30.0)
    hf = hf_model(cfg, ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = hf(tokens, use_cache=False).logits.double()
        want = ref.double()(tokens)
    assert (got - want).abs().max() < 1e-3


def test_left_padded_batch_equals_single_prompts():
    cfg = tiny_config(seq_length=64)
    ref = perturbed_reference(cfg)
    hf = hf_model(cfg, ref.state_dict())
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 64, (1, 20), generator=g), torch.randint(0, 64, (1, 11), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 9, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    with torch.no_grad():
        out = hf(batch, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(out[0], ref(a)[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out[1, 9:], ref(b)[0], rtol=1e-5, atol=1e-4)


def _export(tmp_path, cfg, state, **kwargs):
    tok = tiny_tokenizer(tmp_path / "tok")
    out = tmp_path / "export"
    report = export_hf(state, cfg, out, [tok], **kwargs)
    return out, report


def test_export_files_and_fresh_process_load(tmp_path):
    """config.json, sharded safetensors + index, remote code, tokenizer, generation config; the
    directory loads in a fresh interpreter that never imports mm_megatron."""
    cfg = tiny_config(seq_length=64)
    ref = perturbed_reference(cfg)
    out, report = _export(tmp_path, cfg, ref.state_dict(), max_shard_size=40_000)
    assert report.max_abs_diff < 1e-4 and report.cached_max_abs_diff < 1e-4, report
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "memory_mosaics"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_memory_mosaics.")
    expected = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_heads": 4,
        "intermediate_size": 48,
        "short_window": 8,
        "stm_max_lag": 7,
        "ltm_offset": 3,
        "long_term_memory": True,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    assert {k: config[k] for k in expected} == expected
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    for name in (
        "modeling_memory_mosaics.py",
        "configuration_memory_mosaics.py",
        "cache_memory_mosaics.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]

    tokens = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(5))
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"t = torch.tensor({tokens.tolist()})\n"
        "with torch.no_grad():\n"
        "    logits = m(t).logits\n"
        "    g = m.generate(t, max_new_tokens=12, do_sample=False)\n"
        "assert not [k for k in sys.modules if k.split('.')[0] == 'mm_megatron'], 'imported'\n"
        f"torch.save({{'logits': logits, 'gen': g}}, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], ref(tokens), rtol=1e-5, atol=1e-4)
    assert result["gen"].shape == (1, 42)


def test_export_from_megatron_layout_bf16(tmp_path):
    """A full Megatron state dict (padded vocabulary) exports too; bf16 weights pass parity
    against the reference on the same rounded weights."""
    cfg = tiny_config(seq_length=64, vocab_size=60)  # padded to 64 in the Megatron layout
    ref = perturbed_reference(cfg)
    meg = reference_to_megatron(ref.state_dict(), cfg)
    assert meg["output_layer.weight"].shape[0] == 64
    out, report = _export(tmp_path, cfg, meg, dtype=torch.bfloat16)
    assert report.max_abs_diff < 1e-4, report
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 60


def test_failed_export_leaves_nothing(tmp_path):
    cfg = tiny_config(seq_length=64)
    state = perturbed_reference(cfg).state_dict()
    out = tmp_path / "export"
    broken = dict(state)
    del broken["blocks.1.memories.long.W_lam.weight"]
    with pytest.raises(KeyError, match="W_lam"):
        _export(tmp_path, cfg, broken)
    with pytest.raises(ParityError, match="max"):  # a reference that disagrees
        _export(tmp_path, cfg, state, reference=lambda t: torch.zeros(*t.shape, cfg.vocab_size))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def _megatron_gpt_worker(rank, world, cfg, tokens):
    from mm_testing import init_parallel

    from mm_megatron.config import ParallelConfig
    from mm_megatron.model import build_model, document_causal_mask, transformer_config

    init_parallel(ParallelConfig())
    model = build_model(cfg, transformer_config(cfg)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():  # large enough that attention is far from uniform
            p.copy_(
                torch.randn(p.shape, generator=g) * 0.25
                if p.dim() == 2
                else torch.rand(p.shape, generator=g) + 0.5
            )
        doc_pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        logits = model(tokens, doc_pos, document_causal_mask(doc_pos))
    state = {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    return state, logits


def test_llama_export_matches_megatron(tmp_path):
    """The baseline's Llama export gives Megatron GPTModel's logits; RoPE needs no q/k
    permutation (applying HF's interleave permutation breaks parity)."""
    from transformers import LlamaForCausalLM

    cfg = ModelConfig(
        arch="transformer",
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        ffn_hidden_size=48,
        vocab_size=60,
        seq_length=32,
        make_vocab_size_divisible_by=16,
        rotary_base=10000,
    )
    cfg.validate()
    tokens = torch.randint(0, 60, (2, 24), generator=torch.Generator().manual_seed(6))
    ((meg, want),) = run_ranks(_megatron_gpt_worker, 1, cfg, tokens)
    want = want[..., :60]
    out, report = _export(tmp_path, cfg, meg)
    assert report.max_abs_diff < 1e-4, report
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not (out / "modeling_memory_mosaics.py").exists()
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(megatron_gpt_logits(meg, cfg, tokens), want, rtol=1e-5, atol=1e-4)
    permuted = dict(meg)
    for i in range(cfg.num_layers):  # HF's convert_llama_weights permutation of q and k
        key = f"decoder.layers.{i}.self_attention.linear_qkv.weight"
        w = meg[key].view(4, 3, 8, 32).clone()
        w[:, :2] = w[:, :2].view(4, 2, 4, 2, 32).transpose(2, 3).reshape(4, 2, 8, 32)
        permuted[key] = w.view(-1, 32)
    assert (megatron_gpt_logits(permuted, cfg, tokens) - want).abs().max() > 1e-2
