"""Small corpora and tokenizers for the data-tooling tests, built once per test session."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from mm_megatron.data.bpe_trainer import export_tiktoken, save_tokenizer, train_bpe
from mm_megatron.data.demo_corpus import gather_demo_corpus
from mm_megatron.data.tokenizers import write_tiktoken_ranks


@functools.cache
def session_dir() -> Path:
    """A temporary directory shared by the tests of one session."""
    return Path(tempfile.mkdtemp(prefix="mm_data_tests_"))


@functools.cache
def corpus_docs() -> tuple[str, ...]:
    """About 40 real documents (standard-library modules), plus a few tricky texts."""
    path = session_dir() / "stdlib_small.jsonl"
    gather_demo_corpus(path, max_docs=40, max_bytes=300_000)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    docs += ["héllo wörld — ünïcode ✓ 日本語", "literal <|end_of_text|> inside a document", "x"]
    return tuple(docs)


def write_jsonl(path: Path, docs: list[str] | tuple[str, ...], key: str = "text") -> Path:
    """Write ``docs`` as jsonl."""
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "meta": 1}) + "\n")
    return path


@functools.cache
def corpus_jsonl() -> Path:
    """The corpus as one jsonl file."""
    return write_jsonl(session_dir() / "corpus.jsonl", corpus_docs())


@functools.cache
def hf_tokenizer_dir() -> Path:
    """A byte-level BPE (512 tokens) trained on the corpus, also exported as tiktoken."""
    out = session_dir() / "hf_tok"
    tok = train_bpe(iter(corpus_docs()), 512, min_frequency=2)
    save_tokenizer(tok, out)
    export_tiktoken(tok, out / "exported.tiktoken")
    return out


@functools.cache
def tiktoken_file() -> Path:
    """A tiny hand-made tiktoken BPE file in the Llama-3 format (bytes + a few merges)."""
    ranks = {bytes([b]): b for b in range(256)}
    for merged in (b"th", b"the", b"in", b"er", b"  ", b"    ", b"de", b"def", b"se", b"self"):
        ranks[merged] = len(ranks)
    path = session_dir() / "tiny" / "tokenizer.model"
    path.parent.mkdir(exist_ok=True)
    write_tiktoken_ranks(ranks, path)
    return path


@functools.cache
def sentencepiece_model() -> Path:
    """A tiny SentencePiece BPE model trained on the corpus."""
    import sentencepiece as spm

    out = session_dir() / "sp"
    out.mkdir(exist_ok=True)
    lines = [line for d in corpus_docs() for line in d.splitlines() if line.strip()][:4000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "sp"),
        vocab_size=600,
        model_type="bpe",
        character_coverage=0.9995,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    return out / "sp.model"


def tokenizer_spec(kind: str) -> str:
    """A spec of each supported format: hf, tiktoken, sentencepiece."""
    builders = {
        "hf": lambda: hf_tokenizer_dir() / "tokenizer.json",
        "tiktoken": tiktoken_file,
        "sentencepiece": sentencepiece_model,
    }
    return str(builders[kind]())
