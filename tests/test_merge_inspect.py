"""Merging, inspection, blends, the demo corpus and the tokenizer trainer."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from data_fixtures import corpus_docs, corpus_jsonl, tokenizer_spec, write_jsonl
from paths import ROOT

from mm_megatron.data.blends import BlendError, parse_blend, to_megatron_blend, validate_blend
from mm_megatron.data.demo_corpus import gather_demo_corpus
from mm_megatron.data.indexed import IndexedWriter, merge_datasets, read_index
from mm_megatron.data.inspection import dataset_stats, decode_document, length_histogram
from mm_megatron.data.merging import find_parts, merge
from mm_megatron.data.preprocess import PreprocessConfig, preprocess
from mm_megatron.data.tokenizers import load_tokenizer


def build(prefix, inputs, **kw):
    cfg = PreprocessConfig(
        inputs=[str(i) for i in inputs],
        output_prefix=str(prefix),
        tokenizer=tokenizer_spec("hf"),
        workers=0,
        progress=False,
        **kw,
    )
    return preprocess(cfg)


def test_writer_matches_megatron_builder(tmp_path):
    """Our writer and merge give the same bytes as Megatron's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=n).astype(np.int32) for n in (5, 1, 17, 3)]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for d in docs:
        ref.add_document(torch.from_numpy(d), [len(d)])
    ref.finalize(str(tmp_path / "ref.idx"))
    with IndexedWriter(tmp_path / "ours", np.int32) as w:
        for d in docs[:2]:
            w.add_document(d)
        w.add_documents(np.concatenate(docs[2:]), np.array([len(d) for d in docs[2:]]))
        w.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    # A document of several sequences (as Megatron's sentence splitting writes) merges right.
    multi = IndexedDatasetBuilder(str(tmp_path / "multi.bin"), dtype=np.int32)
    multi.add_document(torch.arange(6, dtype=torch.int32), [2, 4])
    multi.finalize(str(tmp_path / "multi.idx"))
    ref2 = IndexedDatasetBuilder(str(tmp_path / "ref2.bin"), dtype=np.int32)
    for p in ("ref", "multi", "ref"):
        ref2.add_index(str(tmp_path / p))
    ref2.finalize(str(tmp_path / "ref2.idx"))
    merge_datasets([str(tmp_path / p) for p in ("ours", "multi", "ours")], str(tmp_path / "m"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"ref2{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "m"))
    assert len(ds) == 4 + 2 + 4 and len(ds.document_indices) == 4 + 1 + 4 + 1
    index = read_index(tmp_path / "m")
    assert index.num_documents == 9
    assert index.document(4).tolist() == list(range(6))
    assert index.document_lengths().tolist() == [5, 1, 17, 3, 6, 5, 1, 17, 3]


def test_merge_parts_equals_single_run(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", corpus_docs()[:5])
    b = write_jsonl(tmp_path / "b.jsonl", corpus_docs()[5:])
    build(tmp_path / "single", [a, b])
    for rank in range(2):
        build(tmp_path / "run", [a, b], rank=rank, world_size=2)
    parts = find_parts(str(tmp_path / "run"))
    assert parts == [
        str(tmp_path / "run.part-00000-of-00002"),
        str(tmp_path / "run.part-00001-of-00002"),
    ]
    index = merge(parts, str(tmp_path / "run"), delete_inputs=True)
    assert index.num_documents == len(corpus_docs())
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"run{ext}").read_bytes() == (tmp_path / f"single{ext}").read_bytes()
    assert not list(tmp_path.glob("run.part-*"))


def test_merge_errors(tmp_path):
    build(tmp_path / "x", [corpus_jsonl()], rank=0, world_size=3)
    build(tmp_path / "x", [corpus_jsonl()], rank=2, world_size=3)
    with pytest.raises(FileNotFoundError, match="1 of 3 parts are missing"):
        find_parts(str(tmp_path / "x"))
    with IndexedWriter(tmp_path / "wide", np.int32) as w:
        w.add_document([1, 2])
        w.finalize()
    with pytest.raises(ValueError, match="different token dtypes"):
        merge_datasets(
            [str(tmp_path / "x.part-00000-of-00003"), str(tmp_path / "wide")], str(tmp_path / "out")
        )
    (tmp_path / "wide.bin").write_bytes(b"\0\0")  # truncated data file
    with pytest.raises(ValueError, match="the index describes 8"):
        read_index(tmp_path / "wide")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "merge_datasets.py"),
            "--parts-of",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "missing" in out.stderr


def test_inspect(tmp_path):
    build(tmp_path / "ds", [corpus_jsonl()])
    index = read_index(tmp_path / "ds")
    stats = dataset_stats(index)
    assert stats["documents"] == len(corpus_docs()) and stats["dtype"] == "uint16"
    assert stats["tokens"] == int(index.sequence_lengths.sum()) and stats["min"] >= 3
    hist = length_histogram(index)
    assert sum(h[2] for h in hist) == len(corpus_docs())
    assert sum(h[3] for h in hist) == stats["tokens"]
    tok = load_tokenizer(tokenizer_spec("hf"))
    text = decode_document(index, -1, tok)
    assert text == f"<|begin_of_text|>{corpus_docs()[-1]}<|end_of_text|>"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "inspect_dataset.py"),
            str(tmp_path / "ds"),
            "--show",
            "1",
            "--max-chars",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"documents  {len(corpus_docs())}" in out.stdout
    assert corpus_docs()[1] in out.stdout  # decoded with the tokenizer from the sidecar
    assert "tokens/doc" in out.stdout


def test_blends(tmp_path):
    build(tmp_path / "a", [corpus_jsonl()])
    build(tmp_path / "b", [write_jsonl(tmp_path / "b.jsonl", corpus_docs()[:3])])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert parse_blend([a, b]) == [(1.0, a), (1.0, b)]
    assert parse_blend(f"3 {a} 1 {b}") == [(3.0, a), (1.0, b)]
    entries = validate_blend([3, a, 1, b])
    assert [e.weight for e in entries] == [0.75, 0.25]
    assert entries[1].documents == 3
    assert to_megatron_blend(entries) == ([a, b], [0.75, 0.25])
    per_split = validate_blend(
        {"train": [0.5, "a", 0.5, "b"], "valid": ["b"], "test": None}, root=tmp_path
    )
    assert set(per_split) == {"train", "valid"} and per_split["valid"][0].weight == 1.0
    with pytest.raises(BlendError, match="missing"):
        validate_blend([1, a, 1, str(tmp_path / "nope")])
    with pytest.raises(BlendError, match="alternates"):
        validate_blend([1, a, b])
    with pytest.raises(BlendError, match=">= 0"):
        validate_blend([-1, a])
    with pytest.raises(BlendError, match="valid: .*missing"):
        validate_blend({"train": [a], "valid": [str(tmp_path / "c")]})
    with pytest.raises(BlendError, match="unknown split"):
        validate_blend({"training": [a]})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"data": {"blend": [0.7, a, 0.3, b]}}))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "inspect_dataset.py"),
            "--blend-file",
            str(cfg),
            "--blend-key",
            "data.blend",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "p=0.7000" in out.stdout and "p=0.3000" in out.stdout


def test_demo_corpus_is_deterministic(tmp_path):
    c1 = gather_demo_corpus(tmp_path / "a.jsonl", max_docs=25)
    c2 = gather_demo_corpus(tmp_path / "b.jsonl", max_docs=25)
    assert c1["documents"] == 25
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    first = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "module", "text"} and first["id"].startswith("stdlib/")
    small = gather_demo_corpus(tmp_path / "c.jsonl", max_bytes=50_000)
    assert 50_000 <= small["bytes"] < 50_000 + 2_000_000 and c2 == c1


def test_train_tokenizer_cli(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train_tokenizer.py"),
            "--input",
            str(corpus_jsonl()),
            "--vocab-size",
            "800",
            "--llama3-specials",
            "--tiktoken",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "vocabulary 800" in out.stdout
    hf = load_tokenizer(tmp_path / "tokenizer.json")
    tt = load_tokenizer(tmp_path / "tokenizer.model")
    assert hf.vocab_size == tt.vocab_size == 800
    assert (hf.bos_id, hf.eos_id) == (tt.bos_id, tt.eos_id) == (544, 545)
    doc = corpus_docs()[2]
    assert hf.encode(doc) == tt.encode(doc) and hf.decode(hf.encode(doc)) == doc
