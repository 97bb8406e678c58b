"""Loss by position (offline suite, training-time TensorBoard log) and the MQAR suite: bucket
figures equal a direct computation, documents come from indexed datasets or jsonl, a Megatron
checkpoint converted in memory computes the Megatron model's logits, the training option logs
its scalars through the real training program, and bad options fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mm_testing import tiny_config
from mp_harness import run_ranks
from paths import ROOT
from train_runner import base_overrides, env, run, small_dataset

from mm_megatron.convert.hf_config import mm_config_dict
from mm_megatron.data.indexed import IndexedWriter
from mm_megatron.eval.extrapolation_cli import default_token_range
from mm_megatron.eval.mqar import mqar_batch, run_mqar
from mm_megatron.eval.position_loss import load_sequences, run_position_loss
from mm_megatron.hf.configuration_memory_mosaics import MemoryMosaicsConfig
from mm_megatron.hf.modeling_memory_mosaics import MemoryMosaicsForCausalLM

TOOL = ROOT / "tools" / "evaluate.py"


def tiny_hf(seed: int = 0, **overrides) -> MemoryMosaicsForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_config(seq_length=16, **overrides)
    return MemoryMosaicsForCausalLM(MemoryMosaicsConfig(**mm_config_dict(cfg, 62, 63))).eval()


def write_dataset(prefix, docs: list[list[int]]) -> str:
    with IndexedWriter(prefix, np.uint16) as w:
        w.add_documents(np.concatenate([np.asarray(d) for d in docs]), [len(d) for d in docs])
        w.finalize()
    return str(prefix)


def test_position_loss_buckets_equal_a_direct_computation():
    model = tiny_hf()
    seqs = torch.randint(0, 64, (3, 49), generator=torch.Generator().manual_seed(2))
    result = run_position_loss(model, seqs, length=48, bucket_size=16, batch_size=2)
    json.dumps(result)
    assert result["train_length"] == 16 and result["num_sequences"] == 3
    with torch.no_grad():
        logits = model(seqs[:, :-1]).logits
    loss = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none")
    got = [b["loss"] for b in result["buckets"]]
    want = [loss[:, s : s + 16].mean().item() for s in (0, 16, 32)]
    assert got == pytest.approx(want, rel=1e-5)
    assert result["loss_within_train_length"] == pytest.approx(want[0], rel=1e-5)
    assert result["loss_beyond_train_length"] == pytest.approx(sum(want[1:]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="token tensor must be"):  # default length 4 x 16
        run_position_loss(model, seqs)
    for bad in (dict(length=0), dict(length=8, bucket_size=0), dict(length=8, batch_size=0)):
        with pytest.raises(ValueError, match=">= 1"):
            run_position_loss(model, seqs, **bad)


def test_sequences_from_indexed_dataset_and_jsonl(tmp_path):
    docs = [list(range(5)), list(range(100, 130)), [7] * 12, list(range(200, 240))]
    prefix = write_dataset(tmp_path / "ds", docs)
    seqs = load_sequences(prefix, 11, 2)
    assert seqs.tolist() == [docs[1][:12], docs[2][:12]]
    assert load_sequences(prefix, 29).shape == (2, 30)  # only two documents are long enough
    with pytest.raises(ValueError, match="no document has length \\+ 1 = 41 tokens"):
        load_sequences(prefix, 40)
    with pytest.raises(FileNotFoundError, match="neither a .jsonl file nor an indexed dataset"):
        load_sequences(tmp_path / "missing", 4)
    from data_fixtures import hf_tokenizer_dir

    from mm_megatron.data.tokenizers import load_tokenizer

    tok = load_tokenizer(str(hf_tokenizer_dir() / "tokenizer.json"))
    text = "def f(x):\n    return x + 1\n" * 20
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": text}) + "\n")
    ids = tok.encode(text)
    want = ([tok.bos_id] if tok.bos_id is not None else []) + ids
    assert load_sequences(jsonl, 20, tokenizer=tok)[0].tolist() == want[:21]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_sequences(jsonl, 20)


def test_mqar_examples_follow_zoology():
    inputs, labels = mqar_batch(4, 64, 8, (10, 50), bos_id=1, seed=3)
    assert inputs.shape == labels.shape == (4, 64)
    assert (inputs[:, 0] == 1).all() and (labels[:, 0] == -100).all()
    for x, y in zip(inputs.tolist(), labels.tolist(), strict=True):
        keys, values = x[1:17:2], x[2:17:2]
        assert all(10 <= k < 30 for k in keys) and all(30 <= v < 50 for v in values)
        assert len(set(keys)) == 8 and len(set(values)) == 8
        answers = {p: t for p, t in enumerate(y) if t != -100}
        assert len(answers) == 8 and min(answers) > 16
        assert {(x[p], t) for p, t in answers.items()} == set(zip(keys, values, strict=True))
    again = mqar_batch(4, 64, 8, (10, 50), bos_id=1, seed=3)
    assert torch.equal(again[0], inputs)
    with pytest.raises(ValueError, match="too short"):
        mqar_batch(1, 30, 8, (10, 50))
    result = run_mqar(tiny_hf(), [32, 48], token_range=(0, 62), num_examples=3, bos_id=62)
    json.dumps(result)
    assert [r["kv_pairs"] for r in result["results"]] == [2, 3]
    assert [r["answers"] for r in result["results"]] == [6, 9]
    with pytest.raises(ValueError, match="token_range"):
        run_mqar(tiny_hf(), [32], token_range=(0, 65))
    assert default_token_range(4096, [4094, 4095]) == (0, 4094)
    assert default_token_range(64, [0, 1]) == (0, 64)


def test_eval_cli_on_an_hf_directory(tmp_path):
    model = tiny_hf(long_term_memory=True)
    model.save_pretrained(tmp_path / "hf")
    docs = [list(np.random.default_rng(i).integers(0, 62, 70)) for i in range(3)]
    prefix = write_dataset(tmp_path / "ds", docs)
    out = tmp_path / "r.json"
    base = [sys.executable, str(TOOL)]
    common = ["--model", str(tmp_path / "hf"), "--data", prefix, "--sequences", "2"]
    result = subprocess.run(
        [*base, "position-loss", *common, "--output", str(out), "--no-ltm"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["length"] == 64 and data["no_ltm"] is True and len(data["buckets"]) == 16
    result = subprocess.run(
        [*base, "ltm-sweep", *common, "--offsets", "1,8,9"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 1 and "outside [1, stm_max_lag + 1 = 8]" in result.stderr
    result = subprocess.run(
        [*base, "mqar", "--model", "x", "--lengths", "0"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2 and "--lengths" in result.stderr


# --------------------------------------------------------------------------- training log


def _megatron_vs_in_memory(rank, world, root, data):
    """Logits of the Megatron model and of its in-memory HF conversion; a position-loss run."""
    from mm_megatron.convert.megatron_io import load_megatron_checkpoint
    from mm_megatron.convert.megatron_lm import MegatronLM
    from mm_megatron.eval.model_source import load_model

    ckpt = load_megatron_checkpoint(root)
    loaded = load_model(root)
    x = torch.randint(0, ckpt.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded.model(x).logits
    want = MegatronLM(ckpt.state_dict, ckpt.cfg).logits(x)
    result = run_position_loss(loaded.model, data, length=128, num_sequences=2, bucket_size=32)
    return got, want, loaded.source, loaded.train_length, result


def test_training_logs_position_loss_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prefix = small_dataset()[0]
    extra = [
        "logging.position_loss_interval=2",
        "logging.position_loss_length=128",
        "logging.position_loss_bucket=32",
        "logging.position_loss_sequences=2",
    ]
    result = run(base_overrides(tmp_path) + extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "position loss at step 4 (2 documents of 128, trained at 64)" in result.stdout
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    want = {f"position_loss/{a:05d}-{a + 31:05d}" for a in (0, 32, 64, 96)}
    want |= {"position_loss/within_train_length", "position_loss/beyond_train_length"}
    assert want <= tags, tags
    assert [e.step for e in events.Scalars("position_loss/00096-00127")] == [2, 4]
    # the Megatron checkpoint, converted in memory, is the Megatron model
    got, want_logits, source, train_length, offline = run_ranks(
        _megatron_vs_in_memory, 1, str(tmp_path / "ckpt"), prefix
    )[0]
    assert source == "megatron" and train_length == 64
    torch.testing.assert_close(got, want_logits, rtol=1e-4, atol=1e-4)
    logged = events.Scalars("position_loss/00064-00095")[-1].value
    assert offline["buckets"][2]["loss"] == pytest.approx(logged, rel=1e-3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("logging.position_loss_interval=0", "logging.position_loss_interval: must be >= 1"),
        ("logging.position_loss_length=1", "logging.position_loss_length: must be >= 2"),
        ("logging.position_loss_bucket=999", "logging.position_loss_bucket: 999 is larger"),
        ("logging.position_loss_length=100000", "logging.position_loss_length: "),
    ],
)
def test_position_loss_options_fail_clearly(tmp_path, override, message):
    from pretrain.config import load_train_config

    overrides = base_overrides(tmp_path) + ["logging.position_loss_interval=1", override]
    if "100000" not in override:
        with pytest.raises(Exception, match=message):
            load_train_config(str(ROOT / "pretrain/configs/tiny_mm.yaml"), overrides)
        return
    result = run(overrides)  # no document that long: fails at the first step, status 2
    assert result.returncode == 2 and "no document has length + 1" in result.stderr, result.stderr[
        -2000:
    ]
