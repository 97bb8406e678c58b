"""Every Hugging Face export ships a tokenizer that ``AutoTokenizer`` loads with no extra
packages (no tiktoken, no sentencepiece, no remote code) and that gives the training
tokenizer's ids, for each source format: a ``tokenizer.json``, a tiktoken BPE file and a
SentencePiece model (BPE and Unigram)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_fixtures import CORPUS, SAMPLE, load_in_fresh_process
from mm_testing import tiny_config

from mm_megatron.convert.hf_export import export_hf
from mm_megatron.convert.tokenizer_export import (
    convert_tokenizer,
    find_source,
    tiktoken_to_tokenizer,
)
from mm_megatron.data.bpe_trainer import export_tiktoken, save_tokenizer, train_bpe
from mm_megatron.data.tokenizers import TokenizerError, load_tokenizer, write_tiktoken_ranks
from mm_megatron.reference import ReferenceMMModel

pytestmark = pytest.mark.hf


def _sources(root: Path) -> dict[str, tuple[str, list[Path]]]:
    """Training tokenizers of each format: (load_tokenizer spec, files the export gets)."""
    import sentencepiece as spm

    tok = train_bpe(iter(CORPUS), 400, min_frequency=2)
    hf = save_tokenizer(tok, root / "hf")
    tiktoken_dir = root / "tiktoken"
    tiktoken_dir.mkdir()
    export_tiktoken(tok, tiktoken_dir / "tokenizer.model")
    lines = [line for text in CORPUS for line in text.splitlines() if line.strip()]
    out = {
        "hf": (str(hf), [hf, hf.parent / "tokenizer_config.json"]),
        "tiktoken": (str(tiktoken_dir / "tokenizer.model"), [tiktoken_dir / "tokenizer.model"]),
    }
    for model_type in ("bpe", "unigram"):
        prefix = root / f"sp_{model_type}"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(prefix),
            vocab_size=400,
            hard_vocab_limit=False,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.99,
            minloglevel=2,
            num_threads=1,
        )
        model = prefix.with_suffix(".model")
        out[f"sentencepiece_{model_type}"] = (str(model), [model])
    return out


def _model(vocab_size: int) -> tuple[dict, object]:
    cfg = tiny_config(seq_length=64, vocab_size=vocab_size)
    torch.manual_seed(0)
    return ReferenceMMModel(cfg).state_dict(), cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each source exported with a tiny model and loaded back in one fresh process."""
    root = tmp_path_factory.mktemp("tok_export")
    sources = _sources(root / "src")
    dirs, training = {}, {}
    for kind, (spec, files) in sources.items():
        training[kind] = load_tokenizer(spec)
        state, cfg = _model(1024)
        dirs[kind] = root / f"export_{kind}"
        export_hf(state, cfg, dirs[kind], files, check=False)
    return sources, training, dirs, load_in_fresh_process(dirs, SAMPLE, root)


KINDS = ["hf", "tiktoken", "sentencepiece_bpe", "sentencepiece_unigram"]


@pytest.mark.parametrize("kind", KINDS)
def test_exported_tokenizer_gives_the_training_ids(exported, kind):
    """Same ids as training on unicode, whitespace runs, digits and code; BOS first by
    default; pad, model inputs and config ids consistent."""
    _, training, dirs, results = exported
    tok, got = training[kind], results[kind]
    assert got["class"] in ("PreTrainedTokenizerFast", "TokenizersBackend")
    want = [tok.encode(t) for t in SAMPLE]
    assert sum(len(ids) for ids in want) > 100
    assert got["plain"] == want
    assert got["default"] == [[tok.bos_id] + ids for ids in want]
    assert got["keys"] == ["attention_mask", "input_ids"]
    assert got["model_input_names"] == ["input_ids", "attention_mask"]
    mask, ids = got["batch"]["attention_mask"][1], got["batch"]["input_ids"][1]
    assert 0 in mask and {i for i, m in zip(ids, mask, strict=True) if not m} == {got["ids"][2]}
    assert got["decoded"] == (
        SAMPLE[0] if kind == "hf" or kind == "tiktoken" else tok.decode(want[0])
    )
    bos, eos, pad = got["ids"]
    assert (bos, eos) == (tok.bos_id, tok.eos_id) and pad is not None
    config = json.loads((dirs[kind] / "config.json").read_text())
    generation = json.loads((dirs[kind] / "generation_config.json").read_text())
    for source in (config, generation):
        assert [source.get(f"{k}_token_id") for k in ("bos", "eos", "pad")] == [bos, eos, pad]
    tok_config = json.loads((dirs[kind] / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    specials = json.loads((dirs[kind] / "special_tokens_map.json").read_text())
    for role in ("bos", "eos", "pad"):
        assert specials[f"{role}_token"] == tok_config[f"{role}_token"]
    assert got["tokens"] == [tok_config[f"{role}_token"] for role in ("bos", "eos", "pad")]
    card = (dirs[kind] / "README.md").read_text()
    assert f"(id {bos}) is added before every text (assumed: no dataset metadata" in card


def test_pad_is_dedicated_when_the_tokenizer_has_one(exported):
    """Llama 3's <|finetune_right_pad_id|> pads a tiktoken export; the others reuse EOS and the
    card says so."""
    sources, training, dirs, results = exported
    assert results["tiktoken"]["ids"][2] == training["tiktoken"].eos_id + 3
    assert results["hf"]["ids"][2] == training["hf"].eos_id
    assert "pad reuses EOS" in (dirs["hf"] / "README.md").read_text()
    assert "finetune_right_pad_id" in (dirs["tiktoken"] / "README.md").read_text()


def test_tiktoken_conversion_matches_tiktoken_on_a_hand_made_file(tmp_path):
    """Ranks built from bytes + merges (including ones tiktoken reaches only through whole-piece
    lookups) encode as tiktoken does; ids after the ranks are the Llama-3 specials."""
    tiktoken = pytest.importorskip("tiktoken")
    from mm_megatron.data.tokenizers import LLAMA3_PATTERN

    ranks = {bytes([b]): b for b in range(256)}
    for merged in (
        b"  ",
        b"    ",
        b"th",
        b"the",
        b" the",
        b"in",
        b"ing",
        b"12",
        b"123",
        b"\n\n",
        b"de",
        b"def",
        b" d",
        b"xx",
        b"xxxx",
        b"aba",
        b"ab",
    ):
        ranks[merged] = len(ranks)
    enc = tiktoken.Encoding("t", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tok = tiktoken_to_tokenizer(ranks, ["<|begin_of_text|>", "<|end_of_text|>"])
    texts = SAMPLE + ["the thing in the ring", "abababa aba", "x" * 23, "1234123 12 1"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text), text
    assert tok.token_to_id("<|end_of_text|>") == len(ranks) + 1
    path = tmp_path / "tokenizer.model"
    write_tiktoken_ranks(ranks, path)
    exported = convert_tokenizer(find_source([path]))
    assert (exported.bos_id, exported.eos_id) == (len(ranks), len(ranks) + 1)
    assert exported.tokenizer.encode("the").ids == [len(ranks), ranks[b"the"]]


def test_bad_tokenizer_files_fail_naming_the_file(exported, tmp_path):
    sources = exported[0]
    state, cfg = _model(256)  # smaller than the tokenizer
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.json: 400 ids, more than"):
        export_hf(state, cfg, tmp_path / "out", sources["hf"][1], check=False)
    assert not (tmp_path / "out").exists()
    gaps = tmp_path / "gaps.tiktoken"
    write_tiktoken_ranks({bytes([b]): b * 2 for b in range(256)}, gaps)
    with pytest.raises(TokenizerError, match="gaps.tiktoken.*not 0..255 without gaps"):
        convert_tokenizer(find_source([gaps]))
    partial = tmp_path / "partial.tiktoken"
    write_tiktoken_ranks({bytes([b]): b for b in range(200)}, partial)
    with pytest.raises(TokenizerError, match="partial.tiktoken: 56 single bytes have no rank"):
        convert_tokenizer(find_source([partial]))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\x00 not a model")
    with pytest.raises(TokenizerError, match="junk.model"):
        convert_tokenizer(find_source([junk]))
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a readable"):
        convert_tokenizer(find_source([broken]))
