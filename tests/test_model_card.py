"""The README.md model card and the license option of Hugging Face exports, and the export of a
tiktoken-tokenizer checkpoint through tools/convert_checkpoint.py, loaded back with
AutoTokenizer alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_fixtures import CORPUS, SAMPLE, load_in_fresh_process
from mm_testing import tiny_config
from paths import ROOT

from mm_megatron.convert.hf_export import export_hf
from mm_megatron.convert.model_card import (
    blend_datasets,
    render_model_card,
    supported_transformers,
    tokens_trained,
    trained_bos,
)
from mm_megatron.convert.parity import ParityReport
from mm_megatron.data.bpe_trainer import export_tiktoken, save_tokenizer, train_bpe
from mm_megatron.reference import ReferenceMMModel

pytestmark = pytest.mark.hf


def write_meta(prefix: Path, bos_id: int | None, eos_id: int = 1, tokens: int = 4321) -> Path:
    """A ``PREFIX.meta.json`` as preprocessing writes it (only the fields the card reads)."""
    meta = {
        "bos_id": bos_id,
        "eos_id": eos_id,
        "documents": 12,
        "tokens": tokens,
        "tokenizer": "hf:tok/tokenizer.json",
        "vocab_size": 400,
    }
    path = Path(f"{prefix}.meta.json")
    path.write_text(json.dumps(meta))
    return path


def run_config(train_blend: list, iters: int = 100) -> dict:
    return {
        "model": {"seq_length": 64},
        "data": {"train_blend": train_blend},
        "train": {"global_batch_size": 8, "iters": iters},
    }


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("tok") / "hf"
    path = save_tokenizer(train_bpe(iter(CORPUS), 400, min_frequency=2), out)
    return [path, out / "tokenizer_config.json"]


def _state(vocab_size: int = 512) -> tuple[dict, object]:
    cfg = tiny_config(seq_length=64, vocab_size=vocab_size)
    torch.manual_seed(0)
    return ReferenceMMModel(cfg).state_dict(), cfg


def test_card_lists_parameters_tokens_blend_config_parity_and_limits(tmp_path):
    cfg = tiny_config(seq_length=64)
    a, b = tmp_path / "web_text_document", tmp_path / "code_text_document"
    write_meta(a, bos_id=0, tokens=4321)
    config = run_config([0.7, str(a), 0.3, str(b)], iters=1000)
    datasets = blend_datasets(config)
    report = ParityReport(
        max_abs_diff=2.5e-6, max_kl=4e-7, mean_kl=1e-8, cached_max_abs_diff=3.5e-6, prompt_length=26
    )
    card = render_model_card(
        cfg,
        name="mm-tiny",
        num_parameters=1_234_567,
        embedding_parameters=4096,
        parity=report,
        parity_reference="the reference",
        run_config=config,
        iteration=250,
        datasets=datasets,
        license_name="LICENSE",
        dtype="bfloat16",
    )
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "license: other" in card and "license_link: LICENSE" in card
    assert "1.23M (1,234,567)" in card and "4,096" in card
    assert "Tokens trained: 128K (128,000) of 512K (512,000) planned: iteration 250" in card
    assert f"`{supported_transformers()}`" in card and ">=4.56.0,<5.25" in card
    assert f"| train | 0.7 | `{a}` | 12 | 4321 |" in card
    assert f"| train | 0.3 | `{b}` | ? | ? |" in card
    assert "code_text_document.meta.json`: not found" in card
    assert '"tokens": 4321' in card  # the meta file itself
    assert "short_window: 8" in card and "ltm_offset_inference: 3" in card
    for figure in ("2.500e-06", "4.000e-07", "1.000e-08", "3.500e-06"):
        assert figure in card
    assert "trust_remote_code=True" in card and "padded on the left to generate" in card
    assert "See [LICENSE](LICENSE)" in card
    baseline = render_model_card(
        tiny_config(arch="transformer", seq_length=64),
        name="gpt",
        num_parameters=10,
        embedding_parameters=2,
    )
    assert "LlamaForCausalLM" in baseline and "trust_remote_code" not in baseline
    assert "Tokens trained: unknown" in baseline and "skipped" in baseline


def test_run_facts_from_config_and_metadata(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_meta(a, bos_id=None)
    write_meta(b, bos_id=None)
    assert trained_bos(blend_datasets(run_config([str(a), str(b)]))) == (False, None)
    write_meta(b, bos_id=5)
    assert trained_bos(blend_datasets(run_config([str(a), str(b)]))) == (None, None)  # disagree
    assert trained_bos(blend_datasets(run_config([str(b)]))) == (True, 5)
    assert trained_bos(blend_datasets(run_config([str(tmp_path / "missing")]))) == (None, None)
    assert tokens_trained(run_config([str(a)]), 3) == 3 * 8 * 64
    assert tokens_trained({"model": {}}, 3) is None
    (tmp_path / "bad.meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.meta.json: not a readable JSON file"):
        blend_datasets(run_config([str(tmp_path / "bad")]))
    with pytest.raises(ValueError, match="data.train_blend"):
        blend_datasets(run_config([0.5, str(a), 0.5]))


def test_training_without_bos_exports_a_tokenizer_that_adds_none(tmp_path, hf_tokenizer):
    """Blend metadata with bos_id null: no BOS added, none in config.json; the card says so."""
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(str(hf_tokenizer[0])).token_to_id("<|end_of_text|>")
    prefix = tmp_path / "docs_text_document"
    write_meta(prefix, bos_id=None, eos_id=eos)
    state, cfg = _state()
    out = tmp_path / "export"
    export_hf(
        state,
        cfg,
        out,
        hf_tokenizer,
        check=False,
        run_config=run_config([str(prefix)]),
        iteration=4,
    )
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("def main():").ids == tok.encode("def main():", add_special_tokens=False).ids
    config = json.loads((out / "config.json").read_text())
    # transformers 4.x leaves keys whose value is the default (None) out of config.json
    assert (config.get("bos_token_id"), config.get("eos_token_id"), config.get("pad_token_id")) == (
        None,
        eos,
        eos,
    )
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "bos_token" not in tok_config and tok_config["add_bos_token"] is False
    card = (out / "README.md").read_text()
    assert "no BOS is added" in card and "Tokens trained: 2.05K (2,048)" in card
    assert "The parity check was skipped" in card


def test_license_is_checked_first_and_copied(tmp_path, hf_tokenizer):
    state, cfg = _state()
    out = tmp_path / "export"
    with pytest.raises(FileNotFoundError, match="license file .*NOPE.txt not found"):
        export_hf(state, cfg, out, hf_tokenizer, check=False, license_file=tmp_path / "NOPE.txt")
    for name in ("config.json", "README.md", "tokenizer.json"):
        clash = tmp_path / name
        clash.write_text("{}")
        with pytest.raises(ValueError, match=f"{name}.*collides"):
            export_hf(state, cfg, out, hf_tokenizer, check=False, license_file=clash)
        clash.unlink()
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    license_file = tmp_path / "LICENSE.txt"
    license_file.write_text("Use it well.\n")
    export_hf(state, cfg, out, hf_tokenizer, check=False, license_file=license_file)
    assert (out / "LICENSE.txt").read_text() == "Use it well.\n"
    assert "See [LICENSE.txt](LICENSE.txt)" in (out / "README.md").read_text()


CHECKPOINT_THEN_CONVERT = """
import contextlib, io, json, sys, torch
sys.path[:0] = [{tests!r}, {tools!r}]
from mm_testing import tiny_config
from mm_megatron.convert.megatron_io import save_megatron_checkpoint
from mm_megatron.reference import ReferenceMMModel
from mm_megatron.convert.mm_layout import reference_to_megatron
import convert_checkpoint
cfg = tiny_config(seq_length=64, vocab_size=1024)
torch.manual_seed(0)
meg = reference_to_megatron(ReferenceMMModel(cfg).state_dict(), cfg)
save_megatron_checkpoint(meg, cfg, {ckpt!r}, tokenizer=[{tokenizer!r}],
                         config=json.loads({config!r}), iteration=7)
results = []
for argv in json.loads({argvs!r}):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = convert_checkpoint.main(argv)
    results.append([rc, out.getvalue(), err.getvalue()])
print("RESULTS" + json.dumps(results))
"""


def test_tiktoken_checkpoint_converts_to_a_complete_export(tmp_path):
    """The documented 10B set-up in miniature: a checkpoint trained with a Llama-3-format tiktoken
    tokenizer.model, converted with tools/convert_checkpoint.py --to hf --license; AutoTokenizer
    loads the export with no tiktoken, gives the training ids with BOS first, and the card has
    the tokens trained, the blend metadata and the converter's parity figures."""
    from mm_megatron.data.tokenizers import load_tokenizer

    tok_dir = tmp_path / "llama3_tok"
    tok_dir.mkdir()
    export_tiktoken(train_bpe(iter(CORPUS), 400, min_frequency=2), tok_dir / "tokenizer.model")
    training = load_tokenizer(tok_dir / "tokenizer.model")
    prefix = tmp_path / "web_text_document"
    write_meta(prefix, bos_id=training.bos_id, eos_id=training.eos_id)
    config = run_config([1.0, str(prefix)], iters=20)
    config["data"]["tokenizer"] = str(tok_dir / "tokenizer.model")
    ckpt, out = tmp_path / "ckpt", tmp_path / "mm_hf"
    (tmp_path / "LICENSE").write_text("terms\n")
    convert = ["--to", "hf", "--load", str(ckpt), "--save"]
    argvs = [
        convert + [str(tmp_path / "other"), "--license", str(tmp_path / "NOPE")],
        convert + [str(out), "--license", str(tmp_path / "LICENSE")],
    ]
    script = CHECKPOINT_THEN_CONVERT.format(
        tests=str(ROOT / "tests"),
        tools=str(ROOT / "tools"),
        ckpt=str(ckpt),
        tokenizer=str(tok_dir / "tokenizer.model"),
        config=json.dumps(config),
        argvs=json.dumps(argvs),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
    (rc_missing, _, err_missing), (rc, stdout, stderr) = json.loads(
        proc.stdout.split("RESULTS", 1)[1]
    )
    assert rc_missing == 1 and f"--license {tmp_path / 'NOPE'}: not found" in err_missing
    assert not (tmp_path / "other").exists()
    assert rc == 0, stderr[-3000:]
    figures = re.search(r"max\|Δlogit\| (\S+),", stdout)
    assert figures, stdout

    got = load_in_fresh_process({"tiktoken": out}, SAMPLE, tmp_path)["tiktoken"]
    want = [training.encode(t) for t in SAMPLE]
    assert got["plain"] == want and got["default"] == [[training.bos_id] + w for w in want]
    config_json = json.loads((out / "config.json").read_text())
    assert [config_json[f"{k}_token_id"] for k in ("bos", "eos", "pad")] == got["ids"]
    assert got["ids"][:2] == [training.bos_id, training.eos_id]
    assert (out / "LICENSE").read_text() == "terms\n"
    card = (out / "README.md").read_text()
    assert f"| max abs. logit difference, full forward | {float(figures.group(1)):.3e} |" in card
    assert "Tokens trained: 3.58K (3,584) of 10.2K (10,240) planned: iteration 7" in card
    assert '"bos_id": ' + str(training.bos_id) in card
    assert "a tiktoken BPE file (Llama-3 format), `tokenizer.model`" in card
    assert "is added before every text (as in the training data)" in card
    assert "training code's Megatron model" in card
