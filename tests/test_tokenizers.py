"""The tokenizer interface over Hugging Face, tiktoken (Llama-3 format) and SentencePiece."""

import shutil

import numpy as np
import pytest
from data_fixtures import (
    corpus_docs,
    hf_tokenizer_dir,
    session_dir,
    tiktoken_file,
    tokenizer_spec,
)

from mm_megatron.data.indexed import optimal_dtype
from mm_megatron.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

KINDS = ["hf", "tiktoken", "sentencepiece"]
CLASSES = {
    "hf": HFTokenizer,
    "tiktoken": TiktokenTokenizer,
    "sentencepiece": SentencePieceTokenizer,
}


@pytest.mark.parametrize("kind", KINDS)
def test_interface_and_round_trip(kind):
    tok = load_tokenizer(tokenizer_spec(kind))
    assert isinstance(tok, CLASSES[kind])
    assert isinstance(tok, Tokenizer)
    assert tok.name.startswith(f"{kind}:")
    assert tok.bos_id is not None and tok.eos_id is not None and tok.bos_id != tok.eos_id
    assert 0 <= tok.bos_id < tok.vocab_size and 0 <= tok.eos_id < tok.vocab_size
    assert all(p.is_file() for p in tok.files())
    for doc in corpus_docs()[:10] + corpus_docs()[-3:]:
        ids = tok.encode(doc)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        if kind != "sentencepiece":  # SentencePiece normalizes whitespace
            assert tok.decode(ids) == doc
    # The name is a spec that loads the same tokenizer again (what workers do).
    again = load_tokenizer(tok.name)
    assert again.encode(corpus_docs()[0]) == tok.encode(corpus_docs()[0])


def test_hf_special_tokens_and_files():
    tok = load_tokenizer(hf_tokenizer_dir())  # a directory
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id) == (510, 511)  # specials after the BPE ids, as in Llama 3
    assert [p.name for p in tok.files()] == ["tokenizer.json", "tokenizer_config.json"]
    # A special-token string inside a document is text, not a control token.
    assert tok.eos_id not in tok.encode("a <|end_of_text|> b")
    assert tok.decode([tok.bos_id]) == "<|begin_of_text|>"


def test_tiktoken_llama3_layout():
    tok = load_tokenizer(tiktoken_file())  # tokenizer.model sniffed as tiktoken
    assert isinstance(tok, TiktokenTokenizer)
    n_base = 266
    assert tok.vocab_size == n_base + 256
    assert (tok.bos_id, tok.eos_id) == (n_base, n_base + 1)
    assert tok.encode("the") == [257]
    assert tok.eos_id not in tok.encode("<|end_of_text|>")
    assert tok.decode([tok.eos_id]) == "<|end_of_text|>"


def test_tiktoken_export_matches_hf():
    hf = load_tokenizer(hf_tokenizer_dir() / "tokenizer.json")
    tt = load_tokenizer(f"tiktoken:{hf_tokenizer_dir() / 'exported.tiktoken'}")
    for doc in corpus_docs()[:10]:
        assert tt.encode(doc) == hf.encode(doc)


def test_sentencepiece_ids():
    import sentencepiece as spm

    tok = load_tokenizer(f"sentencepiece:{tokenizer_spec('sentencepiece')}")
    sp = spm.SentencePieceProcessor(model_file=tokenizer_spec("sentencepiece"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 600)
    doc = corpus_docs()[3]
    assert tok.encode(doc) == sp.encode(doc)


def test_explicit_bos_eos_override():
    tok = load_tokenizer(tiktoken_file(), bos_token="<|eot_id|>", eos_token="<|eom_id|>")
    assert (tok.bos_id, tok.eos_id) == (266 + 9, 266 + 8)
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(hf_tokenizer_dir(), eos_token="<|nope|>")


def test_bad_specs(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="unknown tokenizer format"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")
    d = session_dir() / "hf_only"
    d.mkdir(exist_ok=True)
    shutil.copy(hf_tokenizer_dir() / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(TokenizerError, match="not tiktoken"):
        load_tokenizer(f"tiktoken:{d}")
    with pytest.raises(TokenizerError, match="empty"):
        load_tokenizer("")


def test_dtype_from_vocab_size():
    assert optimal_dtype(4096) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(128256) == np.int32
