"""tools/convert_checkpoint.py streams layer by layer: its files equal the in-memory export
byte for byte and are world-readable, --parity is validated, a bf16 export converts back,
a killed conversion leaves no temporary behind for long, a foreign HF directory is refused
by name, and the Llama config carries rope_theta for transformers 4.x."""

from __future__ import annotations

import hashlib
import json
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from convert_fixtures import TOOL, convert_many
from hf_fixtures import tiny_tokenizer
from mm_testing import tiny_config
from mp_harness import run_ranks
from paths import ROOT, load_tool
from train_runner import env

CFG = dict(num_layers=3, seq_length=64, make_vocab_size_divisible_by=128)


def _make_checkpoint(rank, world, out, tokenizer):
    from mm_megatron.convert.megatron_io import save_megatron_checkpoint
    from mm_megatron.convert.mm_layout import reference_to_megatron
    from mm_megatron.reference import ReferenceMMModel

    cfg = tiny_config(**CFG)
    torch.manual_seed(0)
    state = ReferenceMMModel(cfg).state_dict()
    for key, value in state.items():
        if key.endswith(("_raw", "gamma")):
            value.add_(0.5 * torch.randn_like(value))
    save_megatron_checkpoint(
        reference_to_megatron(state, cfg), cfg, out, tp=2, pp=1, tokenizer=[tokenizer]
    )


def _in_memory_side(rank, world, ckpt, back, out):
    """The previous, non-streaming conversion (full state dict → export_hf) into ``out``;
    returns the state dicts of ``ckpt`` and ``back``."""
    from mm_megatron.convert.hf_export import export_hf
    from mm_megatron.convert.megatron_io import load_megatron_checkpoint

    loaded = load_megatron_checkpoint(ckpt)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict.items()}
    export_hf(state, loaded.cfg, out, loaded.tokenizer_files, max_shard_size="40kB", check=False)
    return loaded.state_dict, load_megatron_checkpoint(back).state_dict


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 3-layer MM v2 checkpoint saved at TP=2."""
    tmp = tmp_path_factory.mktemp("stream")
    tokenizer = tiny_tokenizer(tmp / "tok")  # 60 ids: fits the tiny model's vocabulary
    run_ranks(_make_checkpoint, 1, str(tmp / "ckpt"), str(tokenizer))
    return tmp / "ckpt"


def _sha(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("model*"))
    }


def test_streamed_export_equals_in_memory_export_and_converts_back(ckpt, tmp_path):
    hf, back = tmp_path / "hf", tmp_path / "back"
    results = convert_many(
        [
            [
                "--to",
                "hf",
                "--load",
                ckpt,
                "--save",
                hf,
                "--dtype",
                "bfloat16",
                "--max-shard-size",
                "40kB",
            ],
            ["--to", "megatron", "--load", hf, "--save", back],  # per-head scalars: fp32 again
        ]
    )
    assert [rc for rc, _ in results] == [0, 0], results
    reference = tmp_path / "in_memory"
    original, converted = run_ranks(_in_memory_side, 1, str(ckpt), str(back), str(reference))[0]
    assert len(_sha(hf)) > 2 and _sha(hf) == _sha(reference)  # several shards, same bytes
    for path in hf.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path.name  # world-readable
    for key, value in original.items():
        scalar = key.endswith(("_raw", "gamma"))  # fp32 in Megatron, bf16 in the export
        assert converted[key].dtype == (torch.float32 if scalar else torch.bfloat16), key
        want = (
            value[:512].to(torch.bfloat16)
            if key.startswith(("embedding", "output"))
            else value.to(torch.bfloat16)
        )
        got = converted[key][:512] if key.startswith(("embedding", "output")) else converted[key]
        assert torch.equal(got.to(torch.bfloat16), want), key


def test_parity_option_is_validated(capsys):
    parse_args = load_tool("convert_checkpoint").parse_args

    base = ["--to", "hf", "--load", "a", "--save", "b"]
    assert parse_args(base).parity == "sample"  # the default keeps memory to a few layers
    assert parse_args(base + ["--no-parity"]).parity == "none"
    for bad, message in (
        (["--parity", "bogus"], "invalid choice: 'bogus'"),
        (["--parity", "full", "--no-parity"], "contradicts"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(base + bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_parity_modes_report_what_they_checked(ckpt, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "test_convert_stream.py"), str(ckpt), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**env(), "PYTHONPATH": str(ROOT / "tests")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sample, full, none = result.stdout.split("\n====\n")[:3]
    assert "sampled: layers 0, 2 of 3" in sample and "tensors identical" in sample
    assert "(full model)" in full and "parity check skipped" in none


def test_killed_conversion_leaves_no_temporary(ckpt, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(TOOL),
        "--to",
        "hf",
        "--load",
        str(ckpt),
        "--save",
        str(out),
        "--parity",
        "full",
    ]

    def start_and_kill(sig: int) -> list[Path]:
        proc = subprocess.Popen(
            cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        return list(tmp_path.glob(".out.tmp-*"))

    assert start_and_kill(signal.SIGTERM) == []  # cleaned up on the way out
    left = start_and_kill(signal.SIGKILL)  # no chance to clean up ...
    assert left and not out.exists()
    ((rc, err),) = convert_many([cmd[2:]])  # ... so the next run removes it
    assert rc == 0, err
    assert not left[0].exists() and out.is_dir()


def test_foreign_hf_directory_is_refused_by_model_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    ).save_pretrained(gpt2)
    ((rc, err),) = convert_many([["--to", "megatron", "--load", gpt2, "--save", tmp_path / "o"]])
    assert rc == 1 and "model_type 'gpt2'" in err and str(gpt2 / "config.json") in err, err
    assert not (tmp_path / "o").exists()


def test_llama_config_has_top_level_rope_theta():
    from mm_megatron.convert.hf_config import hf_config

    cfg = tiny_config(arch="transformer", rotary_base=500000)
    config = json.loads(hf_config(cfg, None, None, torch.float32).to_json_string())
    assert config["rope_theta"] == 500000.0  # transformers 4.x
    assert config["rope_parameters"]["rope_theta"] == 500000.0  # transformers 5.x


if __name__ == "__main__":  # the three --parity modes in one process (saves the imports)
    import contextlib
    import io

    convert_checkpoint = load_tool("convert_checkpoint")

    source, work = sys.argv[1], Path(sys.argv[2])
    outputs = []
    for mode in ("sample", "full", "none"):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            rc = convert_checkpoint.main(
                ["--to", "hf", "--load", source, "--save", str(work / mode), "--parity", mode]
            )
        assert rc == 0, mode
        outputs.append(text.getvalue())
    print("\n====\n".join(outputs + [""]))
