"""tools/convert_checkpoint.py and tools/generate.py --megatron-checkpoint on real training
checkpoints: a TP=2/PP=2 checkpoint exports the same model as its TP=1 reshard, Megatron → HF →
Megatron is the identity, generation from the checkpoint equals generation from the export,
the baseline becomes a Llama model with logit parity, and bad input fails clearly, writing
nothing."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from convert_fixtures import _python, convert, convert_many
from mp_harness import run_ranks
from paths import ROOT
from safetensors.torch import load_file
from train_runner import base_overrides, losses, run

TP2PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(model_dir / name)))
    return out


def _load_states(rank, world, paths):
    from mm_megatron.convert.megatron_io import load_megatron_checkpoint

    return [load_megatron_checkpoint(p).state_dict for p in paths]


def megatron_states(*paths: Path) -> list[dict[str, torch.Tensor]]:
    """Full state dicts of Megatron checkpoints, loaded in a fresh process."""
    return run_ranks(_load_states, 1, [str(p) for p in paths])[0]


def assert_same_weights(got: dict, want: dict, vocab: int) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        a, b = (got[key][:vocab], tensor[:vocab]) if key in VOCAB_KEYS else (got[key], tensor)
        assert a.dtype == b.dtype and torch.equal(a, b), key


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory):
    """A TP=2, PP=2 training run (4 processes): checkpoints at iterations 2 and 4."""
    tmp = tmp_path_factory.mktemp("mm_tp2pp2")
    result = run(base_overrides(tmp) + TP2PP2, nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "ckpt", losses(result.stdout)


@pytest.fixture(scope="module")
def mm_hf(mm_run, tmp_path_factory):
    """The run root exported to HF (the tracker's iteration, 4)."""
    out = tmp_path_factory.mktemp("export") / "mm_hf"
    result = convert("--to", "hf", "--load", mm_run[0], "--save", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter_0000004 (iteration 4, saved at TP=2 PP=2)" in result.stdout
    figures = re.search(
        r"max\|Δlogit\| (\S+), KL\(ref\|\|hf\) max (\S+) .*generate\(\) over "
        r"\d+ tokens max\|Δ\| (\S+) \(cache\) (\S+) \(no cache\)",
        result.stdout,
    )
    assert figures, result.stdout
    max_abs, kl, cached, uncached = map(float, figures.groups())
    assert max_abs < 1e-4 and kl < 1e-5 and cached < 1e-4 and uncached < 1e-4
    return out


def test_tp2pp2_checkpoint_exports_the_same_model_as_its_tp1_reshard(mm_run, mm_hf, tmp_path):
    root, run_losses = mm_run
    tp1 = tmp_path / "tp1"
    result = convert("--to", "megatron", "--load", root, "--save", tp1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "25 tensors identical to the source" in result.stdout
    manifest = json.loads((tp1 / "iter_0000004" / "mm_checkpoint.json").read_text())
    assert manifest["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert (tp1 / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (tp1 / "tokenizer" / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left

    hf_tp1 = tmp_path / "hf_tp1"
    result = convert("--to", "hf", "--load", tp1 / "iter_0000004", "--save", hf_tp1)
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = hf_tensors(mm_hf), hf_tensors(hf_tp1)
    assert set(got) == set(want) and want["lm_head.weight"].shape[0] == 512
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert json.loads((hf_tp1 / "config.json").read_text()) == json.loads(
        (mm_hf / "config.json").read_text()
    )

    # The model-only checkpoint starts training (checkpoint.init_from) exactly as the original.
    firsts = []
    for name, source in (("from_tp1", tp1), ("from_tp2pp2", root)):
        args = [f"checkpoint.init_from={source}", "train.iters=1", "optimizer.warmup_iters=0"]
        ft = run(base_overrides(tmp_path / name) + args)
        assert ft.returncode == 0, ft.stderr[-3000:]
        assert f"initialising model weights from {source / 'iter_0000004'}" in ft.stdout
        firsts.append(losses(ft.stdout)[1])
    assert firsts[0] == firsts[1]
    assert firsts[0][0] != run_losses[1][0]  # not the fresh initialisation


def test_round_trip_megatron_hf_megatron_is_the_identity(mm_run, mm_hf, tmp_path):
    root, _ = mm_run
    back = tmp_path / "back"
    result = convert(
        "--to", "megatron", "--load", mm_hf, "--save", back, "--target-tp", 2, "--target-pp", 2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Megatron vs Hugging Face source: parity on" in result.stdout
    manifest = json.loads((back / "iter_0000000" / "mm_checkpoint.json").read_text())
    assert manifest["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    config = (back / "iter_0000000" / "config.yaml").read_text()
    assert "tensor_model_parallel_size: 2" in config and "arch: mm" in config
    original, converted = megatron_states(root, back)
    assert_same_weights(converted, original, vocab=512)


@pytest.mark.hf
def test_generation_from_checkpoint_equals_generation_from_export(mm_run, mm_hf):
    root, _ = mm_run
    common = ["--prompt", "def main(", "--max-new-tokens", "24", "--greedy", "--device", "cpu"]
    outputs = []
    for source in (["--megatron-checkpoint", root], ["--model", mm_hf]):
        result = _python([ROOT / "tools" / "generate.py", *source, *common])
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] and len(outputs[0]) > len("def main(")


def test_transformer_baseline_converts_to_llama_with_logit_parity(tmp_path):
    from transformers import LlamaForCausalLM

    from mm_megatron.config import load_model_config
    from mm_megatron.convert.references import megatron_gpt_logits

    result = run(base_overrides(tmp_path, "transformer") + ["train.iters=2"], arch="transformer")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "llama"
    result = convert("--to", "hf", "--load", tmp_path / "ckpt", "--save", out)
    assert result.returncode == 0, result.stderr[-3000:]
    max_abs = float(re.search(r"max\|Δlogit\| (\S+),", result.stdout).group(1))
    assert max_abs < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert not (out / "modeling_memory_mosaics.py").exists()
    # Independently: transformers' Llama on the export = plain reference on the checkpoint.
    (state,) = megatron_states(tmp_path / "ckpt")
    cfg = load_model_config(str(tmp_path / "ckpt" / "iter_0000002" / "config.yaml"))
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(tokens).logits
    torch.testing.assert_close(hf, megatron_gpt_logits(state, cfg, tokens), atol=1e-4, rtol=0)


def _copy_run(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("iter_0000002"))
    return dest


def test_bad_input_fails_clearly_and_writes_nothing(mm_run, mm_hf, tmp_path):
    root, _ = mm_run
    bad = {
        name: _copy_run(root, tmp_path / name)
        for name in ("truncated", "missing", "mismatched", "damaged")
    }
    it = "iter_0000004"
    shard = bad["truncated"] / it / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    (bad["missing"] / it / "__2_1.distcp").unlink()
    config = bad["mismatched"] / it / "config.yaml"
    text = config.read_text()  # same size, and a manifest rewritten to match: only the
    config.write_text(text.replace("  ffn_hidden_size: 128", "  ffn_hidden_size: 192"))
    manifest_path = bad["mismatched"] / it / "mm_checkpoint.json"  # weights can tell
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"]["config.yaml"] = hashlib.sha256(config.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    meta = bad["damaged"] / it / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)  # same size: the sha256 tells
    hf_bad = tmp_path / "hf_bad"
    shutil.copytree(mm_hf, hf_bad)
    hf_config = json.loads((hf_bad / "config.json").read_text())
    (hf_bad / "config.json").write_text(json.dumps({**hf_config, "num_hidden_layers": 3}))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    cases = {  # argv, what the error must say
        "truncated": (["--to", "hf", "--load", bad["truncated"]], ["__1_0.distcp", "1000 bytes"]),
        "missing": (["--to", "hf", "--load", bad["missing"]], ["missing file __2_1.distcp"]),
        "mismatched": (
            ["--to", "hf", "--load", bad["mismatched"]],
            [str(config), "decoder.layers.mlp.linear_fc2.weight"],
        ),
        "damaged": (
            ["--to", "megatron", "--load", bad["damaged"]],
            [".metadata does not match its sha256"],
        ),
        "hf_mismatched": (["--to", "megatron", "--load", hf_bad], ["config.json", "blocks.2."]),
        "parity": (
            ["--to", "hf", "--load", root, "--parity-tolerance", "1e-12"],
            ["differs", "max|Δlogit|", "KL(ref||hf)"],
        ),
    }
    argvs = [argv + ["--save", out] for argv, _ in cases.values()]
    argvs.append(["--to", "hf", "--load", root, "--save", existing])
    results = convert_many(argvs)
    for (name, (_, expected)), (rc, stderr) in zip(cases.items(), results, strict=False):
        assert rc == 1, (name, stderr)
        for text in expected:
            assert text in stderr, (name, text, stderr)
    assert results[-1][0] == 1 and "not empty" in results[-1][1]
    assert not out.exists()
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
