"""Long-term memory removed after training (Tables 2, 9, 10) and the inference-m sweep: the
model without LTM computes exactly what a model built with ``long_term_memory: false``
computes with the STM half of W_o (HF model, reference model, cached decoding), m is
validated and restored, and ``convert_checkpoint.py --to hf --drop-ltm`` writes a valid
no-LTM model with parity against the reference built the same way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mm_testing import tiny_config
from mp_harness import run_ranks
from safetensors.torch import load_file

from mm_megatron.convert.hf_config import mm_config_dict
from mm_megatron.convert.mm_layout import reference_to_hf
from mm_megatron.eval.ltm_ablation import (
    apply_ltm_removal,
    drop_ltm_state_dict,
    get_ltm_offset,
    run_ltm_sweep,
    set_ltm_offset,
)
from mm_megatron.hf.configuration_memory_mosaics import MemoryMosaicsConfig
from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsCache, MemoryMosaicsForCausalLM
from mm_megatron.reference import ReferenceMMModel

T = 40  # crosses h = 8 and m = 3 many times


def perturbed(cfg, seed: int = 0) -> ReferenceMMModel:
    """A reference model with scalars and gates away from their initial values."""
    torch.manual_seed(seed)
    ref = ReferenceMMModel(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("_raw", "gamma")):
                p.add_(0.5 * torch.randn_like(p))
            elif name.startswith(("embedding", "W_c")):
                p.mul_(10.0)
    return ref


def hf_model(cfg, state) -> MemoryMosaicsForCausalLM:
    model = MemoryMosaicsForCausalLM(MemoryMosaicsConfig(**mm_config_dict(cfg, None, None)))
    model.load_state_dict(reference_to_hf(state), strict=True)
    return model.eval()


def tokens(n: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_hf_removal_equals_model_built_without_ltm():
    cfg = tiny_config()
    state = perturbed(cfg).state_dict()
    full = hf_model(cfg, state)
    built = hf_model(tiny_config(long_term_memory=False), drop_ltm_state_dict(state, 32))
    x = tokens()
    before = full(x).logits
    assert apply_ltm_removal(full) is full
    assert full.config.long_term_memory is False
    assert all(
        "long" not in b.memories and b.W_o.weight.shape == (32, 32) for b in full.model.blocks
    )
    assert set(full.state_dict()) == set(built.state_dict())
    after = full(x).logits
    assert torch.equal(after, built(x).logits)
    assert (after - before).abs().max() > 1e-2  # the LTM did contribute
    # cached decoding (prefill, then one token at a time) runs on the model without LTM; in
    # fp64 (norms and per-head scalars stay fp32), as one token at a time rounds differently
    # from the full forward
    full = full.double()
    cache = MemoryMosaicsCache(full.config)
    steps = [full(x[:, :20], cache=cache).logits]
    steps += [full(x[:, t : t + 1], cache=cache).logits for t in range(20, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_reference_removal_equals_reference_built_without_ltm():
    cfg = tiny_config()
    ref = perturbed(cfg)
    built = ReferenceMMModel(tiny_config(long_term_memory=False)).eval()
    built.load_state_dict(drop_ltm_state_dict(ref.state_dict(), 32), strict=True)
    apply_ltm_removal(ref)
    assert ref.cfg.long_term_memory is False and cfg.long_term_memory is True
    x = tokens()
    assert torch.equal(ref(x), built(x))


def test_removal_errors():
    cfg = tiny_config()
    model = hf_model(cfg, perturbed(cfg).state_dict())
    apply_ltm_removal(model)
    with pytest.raises(ValueError, match="no long-term memory"):
        apply_ltm_removal(model)
    with pytest.raises(ValueError, match="no long-term memory"):
        set_ltm_offset(model, 3)
    with pytest.raises(TypeError, match="not an MM v2 model"):
        apply_ltm_removal(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"not \[d, 2d\]"):
        drop_ltm_state_dict({"blocks.0.W_o.weight": torch.zeros(32, 32)}, 32)


@torch.no_grad()
def test_inference_m_equals_model_built_with_that_m_and_is_validated():
    cfg = tiny_config()  # h = 8: stm_max_lag 7, legal m in [1, 8]
    state = perturbed(cfg).state_dict()
    model = hf_model(cfg, state)
    x = tokens()
    assert get_ltm_offset(model) == 3
    assert set_ltm_offset(model, 8) == 3
    built = hf_model(tiny_config(ltm_offset_inference=8), state)
    assert torch.equal(model(x).logits, built(x).logits)
    for bad in (0, 9, -1, 2.5, True):
        with pytest.raises(ValueError, match="ltm offset m"):
            set_ltm_offset(model, bad)
    assert get_ltm_offset(model) == 8
    ref = perturbed(cfg)
    set_ltm_offset(ref, 8)
    torch.testing.assert_close(ref(x), built(x).logits, rtol=1e-4, atol=1e-4)


def test_ltm_sweep_returns_json_and_restores_the_model():
    cfg = tiny_config(seq_length=24)
    model = hf_model(cfg, perturbed(cfg).state_dict())
    seqs = tokens(3, 33, seed=4)
    result = run_ltm_sweep(model, seqs, [1, 3, 8], length=32, bucket_size=8, include_no_ltm=True)
    json.dumps(result)
    assert [r["ltm_offset"] for r in result["results"]] == [1, 3, 8]
    assert result["model_ltm_offset"] == 3 and get_ltm_offset(model) == 3
    assert "long" in model.model.blocks[0].memories  # the removal ran on a copy
    assert len({round(r["loss"], 6) for r in result["results"]}) == 3
    assert [b["start"] for b in result["results"][0]["buckets"]] == [0, 8, 16, 24]
    assert result["results"][0]["extrapolation_gap"] is not None
    with torch.no_grad():
        logits = apply_ltm_removal(model)(seqs[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), seqs[:, 1:])
    assert result["without_ltm"]["loss"] == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="outside"):
        run_ltm_sweep(hf_model(cfg, perturbed(cfg).state_dict()), seqs, [3, 9], length=32)


# --------------------------------------------------------------------------- export option


def _train_tiny(tmp):
    from train_runner import base_overrides, run

    result = run(base_overrides(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "ckpt"


def _reference_without_ltm(rank, world, root):
    """Logits of the reference model built without LTM from the checkpoint's weights, and of
    the reference with LTM (to show the two differ), on fixed tokens."""
    import dataclasses

    from mm_megatron.convert.megatron_io import load_megatron_checkpoint
    from mm_megatron.convert.mm_layout import megatron_to_reference

    ckpt = load_megatron_checkpoint(root)
    ref_state = megatron_to_reference(ckpt.state_dict, ckpt.cfg)
    cfg = dataclasses.replace(ckpt.cfg, long_term_memory=False)
    x = torch.randint(0, ckpt.cfg.vocab_size, (1, 50), generator=torch.Generator().manual_seed(3))
    models = {}
    for name, c, s in (
        ("without", cfg, drop_ltm_state_dict(ref_state, cfg.hidden_size)),
        ("with", ckpt.cfg, ref_state),
    ):
        model = ReferenceMMModel(c).eval()
        model.load_state_dict(s, strict=True)
        with torch.no_grad():
            models[name] = model(x)
    return x, models, cfg.hidden_size


def test_convert_drop_ltm_exports_a_valid_model_without_ltm(tmp_path):
    from paths import ROOT
    from train_runner import env

    root = _train_tiny(tmp_path)
    out = tmp_path / "no_ltm"
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    result = subprocess.run(
        [*tool, "--to", "hf", "--drop-ltm", "--load", str(root), "--save", str(out)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without long-term memory" in result.stdout and "parity on" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["long_term_memory"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not [k for k in index["weight_map"] if ".memories.long." in k]
    weights = {}
    for shard in set(index["weight_map"].values()):
        weights.update(load_file(str(out / shard)))
    x, logits, d = run_ranks(_reference_without_ltm, 1, str(root))[0]
    assert weights["model.blocks.0.W_o.weight"].shape == (d, d)
    model = MemoryMosaicsForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, logits["without"], rtol=1e-5, atol=1e-4)
    assert (logits["with"] - logits["without"]).abs().max() > 1e-4
    # usage errors: not for --to megatron; nothing written on failure
    bad = subprocess.run(
        [
            *tool,
            "--to",
            "megatron",
            "--drop-ltm",
            "--load",
            str(root),
            "--save",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2 and "--drop-ltm applies to --to hf" in bad.stderr
    assert not (tmp_path / "x").exists()
